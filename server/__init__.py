"""Flower ServerApp: aggregation of adapter updates, checkpoints and server-side evaluation."""
