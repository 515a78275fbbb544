"""Benchmarks: scripts that print figures (BENCHMARKS.md). Run them from the repository root."""
