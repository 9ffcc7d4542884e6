"""Benchmarks: commands that measure, with their figures in README.md."""
