"""Configuration, models, data, metrics and privacy code shared by server and client."""
