"""Simulation runner, data partitioners, reports and benchmark scripts."""
