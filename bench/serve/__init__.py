"""Parts of bench/bench_serve.py: the model and adapters (setup), the contenders (runs) and the
report (report)."""
