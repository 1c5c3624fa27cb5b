"""Benchmark scripts (run with ``python -m perl_jax.benchmarks.<name>``); not part of the tests."""
