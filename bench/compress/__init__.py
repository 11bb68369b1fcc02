"""Pieces of the compression benchmark (``bench/bench_compress.py``)."""
