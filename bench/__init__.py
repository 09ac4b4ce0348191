"""Benchmarks and the load generator (not part of the installed package)."""
