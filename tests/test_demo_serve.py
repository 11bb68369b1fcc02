"""The demo's reading of the server's /metrics: per-adapter figures from the very text the
server's Metrics class writes (hand-chosen requests, hand-worked sums and means)."""
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")


def test_parse_metrics_reads_what_the_server_writes():
    from deltakit.demo_serve import parse_metrics
    from deltakit.serve._metrics import Metrics

    engine = SimpleNamespace(queue_depth=2, running=1)
    residency = SimpleNamespace(tiers=lambda: {"device": 1, "host": 0, "disk": 3},
                                tiers_by_kind=lambda: {("device", "adapter"): 1, ("disk", "adapter"): 3},
                                loads=Counter(), prefetches=Counter())
    m = Metrics(engine, residency)
    # adapter, outcome, prompt tokens, completion tokens, seconds, seconds to the first token
    m.finished("a", "length", 10, 6, 0.5, 0.25)
    m.finished("a", "stop", 12, 2, 1.5, 0.125)
    m.finished("base", "length", 7, 6, 0.75, None)   # no token came out: no first-token time
    m.refused("", 404)                                # an unknown model: counted, no tokens
    got = parse_metrics(m.text().decode())
    assert got == {
        "a": {"requests": 2, "prompt_tokens": 22, "completion_tokens": 8, "latency_s": 1.0, "first_token_s": 0.188},
        "base": {"requests": 1, "prompt_tokens": 7, "completion_tokens": 6, "latency_s": 0.75, "first_token_s": None},
        "": {"requests": 1, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": None, "first_token_s": None},
    }
