"""Pieces of the PEFT-methods benchmark (``bench/bench_methods.py``)."""
