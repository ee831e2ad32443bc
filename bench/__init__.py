"""Benchmarks of the worker against the floor of a minimal synchronous Python loop."""
