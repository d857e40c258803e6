"""Northbound sinks: one delivery attempt per call; the forwarder owns retries."""
