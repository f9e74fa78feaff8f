"""Benchmarks and the paper's experiments (scripts in this folder; shared harness in :mod:`bench.evals`)."""
