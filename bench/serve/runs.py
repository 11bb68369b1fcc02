"""The contenders of the serving benchmark, each given the same requests (prompt, adapter) in
the same order at the same concurrency.

* ``deltakit``: the server's :class:`~deltakit.serve.engine.Engine` driven directly, closed loop:
  ``concurrency`` requests in flight, the next submitted when one finishes (continuous batching:
  it joins the running batch between decode steps). Latency: submission to the last token.
* ``http``: the same engine behind the OpenAI-compatible app on 127.0.0.1, driven by
  ``concurrency`` threads of the ``openai`` client (non-streaming completions with token-id
  prompts); latency measured by the client. The gap to ``deltakit`` is the API's cost.
* ``peft``: peft's ``generate(..., adapter_names=rows)`` on static batches of ``concurrency``
  requests (the next batch starts when the last one ends; every request of a batch waits for it).
* ``merged``: the engine on a second SmolLM2 with ``a0`` merged into its weights: no adapter work
  at all, the ceiling.

Every request generates exactly ``max_tokens`` tokens (no EOS stop) so all contenders do the
same work. Each run records its tokens (to check that contenders agree), the wall time, the
1-minute load before and after, and for the engine the adapters present at every decode step
(the memory-traffic bound is computed from them).
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Job:
    """One request of the workload: its index, prompt ids and adapter name (None: the base)."""

    index: int
    prompt: list[int]
    adapter: str | None


def _summary(name: str, lat: list[float], tokens: dict[int, list[int]], wall: float, load0: float,
             errors: int, **extra) -> dict:
    n_tok = sum(len(t) for t in tokens.values())
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    asked = {a for a in extra.pop("adapters", []) if a is not None}
    return {"contender": name, "requests": len(lat), "distinct_requested": len(asked), "errors": errors,
            "tokens": n_tok, "wall_s": round(wall, 3),
            "tokens_per_s": round(n_tok / wall, 3), "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(q[98], 3), "latencies_s": [round(x, 3) for x in lat],
            "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "out_tokens": tokens, **extra}


class StepTrace:
    """Wraps an engine's decode step to record the adapter keys of the rows in each decode (the
    kernel caches its stacked factors per list of adapters present, so a step whose list differs
    from the previous step's re-stacks them: counted in the report)."""

    def __init__(self, engine):
        self.engine, self.steps = engine, []
        self._orig = engine._decode

        def traced():
            # in row order of first appearance: the order mixed_batch hands the kernel its adapters
            self.steps.append(tuple(dict.fromkeys(r.adapter for r in engine._reqs if r.adapter is not None)))
            self._orig()
        engine._decode = traced

    def take(self) -> list[tuple]:
        out, self.steps = self.steps, []
        return out


def run_engine(engine, residency, jobs: list[Job], concurrency: int, max_tokens: int, name: str = "deltakit",
               trace: StepTrace | None = None, time_limit: float = 600.0) -> dict:
    """Closed loop over ``jobs``; stops submitting after ``time_limit`` s (the rest are not counted)."""
    from deltakit.serve.engine import Request

    slots, cv = threading.Semaphore(concurrency), threading.Condition()
    start, lat, tokens, count = {}, [], {}, {"errors": 0, "submitted": 0, "finished": 0}

    def sink_for(job: Job, req_box: list):
        def sink(ev):
            if ev.kind == "token":
                return
            with cv:
                if ev.kind == "done" and ev.reason == "length":
                    lat.append(time.perf_counter() - start[job.index])
                    tokens[job.index] = list(req_box[0].tokens)
                else:
                    count["errors"] += 1
                count["finished"] += 1
                cv.notify_all()
            slots.release()
        return sink

    if trace is not None:
        trace.take()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    for job in jobs:
        slots.acquire()
        if time.perf_counter() - t0 > time_limit:
            slots.release()
            break
        key = residency.acquire(job.adapter).key if job.adapter is not None else None
        box: list = []
        req = Request(prompt=job.prompt, max_tokens=max_tokens, sink=sink_for(job, box), adapter=key)
        box.append(req)
        with cv:
            count["submitted"] += 1
            start[job.index] = time.perf_counter()
        engine.submit(req)
    with cv:
        cv.wait_for(lambda: count["finished"] == count["submitted"])
    wall = time.perf_counter() - t0
    steps = trace.take() if trace is not None else []
    asked = [j.adapter for j in jobs if j.index in start]
    return _summary(name, lat, tokens, wall, load0, count["errors"], adapters=asked, decode_steps=len(steps),
                    step_keys=[list(s) for s in steps])


def run_peft(model, jobs: list[Job], batch: int, max_tokens: int, pad: int, time_limit: float = 600.0) -> dict:
    """Static batches of ``batch`` jobs through peft's ``generate`` with ``adapter_names``."""
    lat, tokens = [], {}
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    for i in range(0, len(jobs), batch):
        if time.perf_counter() - t0 > time_limit:
            break
        chunk = jobs[i:i + batch]
        width = max(len(j.prompt) for j in chunk)
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in chunk])
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in chunk])
        b0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=[j.adapter for j in chunk],
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        took = time.perf_counter() - b0
        for j, row in zip(chunk, out[:, width:].tolist()):
            tokens[j.index] = row
            lat.append(took)
    asked = [j.adapter for j in jobs if j.index in tokens]
    return _summary("peft", lat, tokens, time.perf_counter() - t0, load0, 0, adapters=asked)


def run_http(url: str, jobs: list[Job], concurrency: int, max_tokens: int, base: str,
             time_limit: float = 600.0) -> dict:
    """``concurrency`` client threads, each sending its share of ``jobs`` one after another."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    lat, tokens, errors, lock = [], {}, [0], threading.Lock()
    it, t0 = iter(jobs), time.perf_counter()

    def worker():
        while time.perf_counter() - t0 <= time_limit:
            with lock:
                job = next(it, None)
            if job is None:
                return
            s = time.perf_counter()
            try:
                r = client.completions.create(model=job.adapter or base, prompt=job.prompt, max_tokens=max_tokens,
                                              temperature=0)
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                lat.append(time.perf_counter() - s)
                tokens[job.index] = [r.usage.completion_tokens, job.adapter]
    load0 = os.getloadavg()[0]
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = _summary("http", lat, {}, time.perf_counter() - t0, load0, errors[0],
                   adapters=[t[1] for t in tokens.values()])
    res["tokens"] = sum(t[0] for t in tokens.values())
    res["tokens_per_s"] = round(res["tokens"] / res["wall_s"], 3)
    return res
