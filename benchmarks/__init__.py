"""accelprune benchmarks: one harness (harness.py) and one script per hot path.

Run one from the repository root, e.g. ``python -m benchmarks.bench_ward``.
"""
