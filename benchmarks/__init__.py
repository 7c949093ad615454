"""flowkern's benchmark suite: `python -m benchmarks` (what `make bench` runs)."""
