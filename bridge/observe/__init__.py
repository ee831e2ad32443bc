"""Observability: per-request ``meta``, counters and histograms, telemetry frames, LM usage.
Imports only ``wire``."""
