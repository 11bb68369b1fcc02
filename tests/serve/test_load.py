"""A bounded load test against 127.0.0.1 (40 requests, concurrency 8, three adapters and the
base, a hard time limit): zero errors, every answer equal to the request decoded alone, and the
latency percentiles recorded (printed; run with -s to see them)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import openai
import pytest

from tests.serve.conftest import BASE, KEY, start_server

N, CONCURRENCY, LIMIT_S = 40, 8, 60.0


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


@pytest.mark.slow
def test_bounded_load_has_no_errors_and_records_latency(adapter_root, reference):
    srv = start_server(adapter_root, max_batch=8, max_queue=64)
    models = ["a", "b", "c", BASE]
    jobs = [(f"w{1 + i % 50} w{2 + i % 47} w{3 + i % 41}", models[i % 4], 4 + i % 9) for i in range(N)]
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=LIMIT_S)

    def one(job):
        prompt, model, n = job
        t = time.monotonic()
        try:
            text = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text
            return text, time.monotonic() - t, None
        except Exception as e:  # counted, not raised: the test reports every error
            return None, time.monotonic() - t, repr(e)

    try:
        start = time.monotonic()
        with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, jobs, timeout=LIMIT_S))
        wall = time.monotonic() - start
    finally:
        srv.stop()
    errors = [r[2] for r in results if r[2]]
    lat = [r[1] for r in results]
    figures = {"requests": N, "concurrency": CONCURRENCY, "errors": len(errors), "wall_s": round(wall, 2),
               "p50_s": round(_percentile(lat, 0.5), 3), "p99_s": round(_percentile(lat, 0.99), 3),
               "requests_per_s": round(N / wall, 1)}
    print("\nserve load test:", json.dumps(figures))
    assert not errors, errors[:3]
    want = reference.completions([(p, None if m == BASE else m, n) for p, m, n in jobs])
    assert [r[0] for r in results] == want
