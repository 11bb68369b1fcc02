"""The demo's serving step: the demo's generative adapters behind ``deltakit serve``.

The SmolLM2 model the generative part already holds (so nothing is loaded twice) is served on
127.0.0.1 at a free port, as the base and as the LoRA the demo trained; a few chat requests for
both go out at once through the official ``openai`` client, so they share the server's batches.
The step prints each model's answers, then the server's own per-adapter figures parsed from
``/metrics`` (requests, prompt and completion tokens, mean latency and time to first token), and
stops the server (uvicorn stops accepting, the engine drains). It checks what it prints: every
request answered, and the server counted exactly the requests and completion tokens the client
received; a mismatch raises.

It needs the ``serve`` packages (FastAPI, uvicorn, prometheus_client) and ``openai``; ``make demo``
installs them with the ``demo`` extra.
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["ServeJob", "check_serving_available", "serve_and_ask", "parse_metrics", "HOST"]

HOST = "127.0.0.1"  # the demo never listens beyond this machine
_NEEDED = ("fastapi", "uvicorn", "prometheus_client", "openai")


@dataclass(frozen=True)
class ServeJob:
    """One request the step sends: the served model's name and the chat messages."""

    model: str
    messages: tuple[Mapping[str, str], ...]


def check_serving_available() -> None:
    """Raise (one line) before any work when a package the serving step needs is missing."""
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the demo's serving step needs {', '.join(missing)} (expected the 'demo' extra: "
                          f"pip install 'deltakit[demo]'), found them missing")


def serve_and_ask(model: nn.Module, tokenizer, base_name: str, adapters: Mapping[str, str],
                  jobs: Sequence[ServeJob], max_tokens: int) -> dict:
    """Serve ``model`` as ``base_name`` plus ``adapters`` (name -> directory, attached on first
    use), send ``jobs`` concurrently, scrape ``/metrics``, stop. Returns ``{"answers": [{model,
    answer, completion_tokens, seconds}...], "metrics": {model: {...}}, "url", "seconds"}``."""
    from .serve.engine import Limits
    from .serve.server import LiveServer, ServeOptions, build_app

    t0 = time.perf_counter()
    opts = ServeOptions(adapters=dict(adapters), limits=Limits(max_batch=max(1, len(jobs)), max_tokens=max_tokens))
    server = LiveServer(build_app(model, tokenizer, base_name, opts), host=HOST, port=0).start()
    try:
        url = server.url
        answers = _ask_all(url, jobs, max_tokens)
        metrics = parse_metrics(_get(f"{url}/metrics"))
    finally:
        server.stop()
    _check_counts(answers, metrics)
    return {"url": url, "answers": answers, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2)}


def _ask_all(url: str, jobs: Sequence[ServeJob], max_tokens: int) -> list[dict]:
    """Every job at once (one thread each, so the server batches them), greedy; answers in job order."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300)

    def ask(job: ServeJob) -> dict:
        t = time.perf_counter()
        out = client.chat.completions.create(model=job.model, messages=[dict(m) for m in job.messages],
                                             max_tokens=max_tokens, temperature=0)
        return {"model": job.model, "answer": out.choices[0].message.content,
                "finish_reason": out.choices[0].finish_reason,
                "completion_tokens": out.usage.completion_tokens, "prompt_tokens": out.usage.prompt_tokens,
                "seconds": round(time.perf_counter() - t, 3)}

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(ask, jobs))


def _get(url: str) -> str:
    import httpx

    r = httpx.get(url, timeout=30)
    r.raise_for_status()
    return r.text


def parse_metrics(text: str) -> dict[str, dict]:
    """The server's Prometheus text as ``{adapter: {requests, prompt_tokens, completion_tokens,
    latency_s, first_token_s}}``: requests summed over outcomes, the two times the histograms'
    means (sum / count). The ``adapter=""`` row (requests naming no served model) is kept."""
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[str, dict] = {}
    sums: dict[tuple[str, str], float] = {}

    def row(adapter: str) -> dict:
        return rows.setdefault(adapter, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            a = s.labels.get("adapter")
            if a is None:
                continue
            if s.name == "deltakit_requests_total":
                row(a)["requests"] += int(s.value)
            elif s.name == "deltakit_tokens_total":
                row(a)[f"{s.labels['kind']}_tokens"] += int(s.value)
            elif s.name.endswith(("_seconds_sum", "_seconds_count")):
                sums[(a, s.name)] = s.value
    for a, r in rows.items():
        for key, metric in (("latency_s", "deltakit_request_latency_seconds"),
                            ("first_token_s", "deltakit_time_to_first_token_seconds")):
            n = sums.get((a, f"{metric}_count"), 0)
            r[key] = round(sums[(a, f"{metric}_sum")] / n, 3) if n else None
    return rows


def _check_counts(answers: list[dict], metrics: dict[str, dict]) -> None:
    """The server counted what the client saw: per model, the requests sent and the completion
    tokens received (a mismatch is a bug in the server's bookkeeping, so it raises)."""
    for name in {a["model"] for a in answers}:
        mine = [a for a in answers if a["model"] == name]
        got = metrics.get(name, {})
        want = {"requests": len(mine), "completion_tokens": sum(a["completion_tokens"] for a in mine),
                "prompt_tokens": sum(a["prompt_tokens"] for a in mine)}
        if any(got.get(k) != v for k, v in want.items()):
            raise RuntimeError(f"/metrics for {name}: expected {want}, found {got}")
