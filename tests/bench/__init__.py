"""Benchmark tests: the bench tools on tiny models, and the generated docs."""
