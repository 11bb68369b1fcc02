"""The routing benchmark's parts (``bench/bench_routing.py`` runs them)."""
