"""Benchmarks: dense vs compressed DeiT timed in the same run, the Pareto plot, the service
end to end, and the report that writes the docs' tables; imported by the CLI and jobs only.

``models`` is the sweep over configs (its measuring method is :mod:`app.timing`, shared with
the compress job), ``pareto`` speed vs fidelity, ``report`` the generated tables.
"""
