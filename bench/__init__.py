"""Benchmarks (``make bench``): figures printed, compared with targets and peers."""
