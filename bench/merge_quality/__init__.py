"""Pieces of the merge-quality benchmark (``bench/bench_merge_quality.py``)."""
