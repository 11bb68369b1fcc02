"""Admission stall with and without prefetch (issue 17 item 3): SmolLM2-135M with a few rows
decoding, while requests for adapters not yet loaded arrive one every few steps.

The engine is stepped by hand on this thread (it plays the scheduler); each step is timed, and
so is the scheduler's time in ``Residency.ensure`` (the admission's adapter load). Without
prefetch a cold admission reads the file, checks its sha256 and attaches on the scheduler
thread; with prefetch the read runs on the residency's reader thread while the rows decode,
and admission attaches only. Every run registers the adapters under fresh keys, so each
admission is cold (the base fingerprint is computed once, by a warm-up load, before timing).
The files were just written, so "disk" here is the page cache: a real disk read makes the
no-prefetch stall larger, not smaller.

    PYTHONPATH=src python bench/serve_prefetch.py --cold 12 --rank 16
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import deltakit as dk
from deltakit.io.models import load_causal_lm
from deltakit.serve.engine import Engine, Limits, Request
from deltakit.serve.residency import Residency


def make_adapters(model, root: Path, n: int, rank: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ad = dk.attach(model, dk.LoraConfig(r=rank), name=f"x{i}")
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out.append(dk.save_adapter(ad, root / f"x{i}"))
        dk.detach(model, f"x{i}")
    return out


def run(model, root: Path, paths: list[Path], *, prefetch: int, running: int, gap: int, new: int,
        tag: str) -> dict:
    res = Residency(model, roots=[root], capacity=len(paths) + 2, host_capacity=len(paths) + 2)
    res.ensure(res.register(f"warm{tag}", paths[0]))         # the base fingerprint, computed once
    names = [f"{tag}{i}" for i in range(len(paths))]
    for n, p in zip(names, paths):
        res.register(n, p)
    engine = Engine(model, eos_token_ids=[], pad_token_id=0, residency=res, prefetch=prefetch,
                    limits=Limits(max_batch=running + len(paths), max_tokens=4096, timeout=3600))
    loads: list[float] = []
    ensure = res.ensure

    def timed(key: str) -> None:
        t = time.perf_counter()
        ensure(key)
        loads.append(time.perf_counter() - t)

    res.ensure = timed
    reqs = [Request(prompt=[1, 2, 3, 4, 5, 6, 7, 8], max_tokens=new + gap * len(paths) + 8, sink=lambda e: None)
            for _ in range(running)]
    for r in reqs:
        engine.submit(r)
    engine.step()                                             # the running rows' prefill
    loads.clear()
    steps, admit_steps, cold = [], [], []
    i = 0
    while not all(r.finished for r in reqs + cold):
        if i % gap == 0 and len(cold) < len(names):
            r = Request(prompt=[9, 10, 11, 12, 13, 14, 15, 16], max_tokens=new, sink=lambda e: None,
                        adapter=res.acquire(names[len(cold)]).key)
            cold.append(r)
            engine.submit(r)
        before = len(loads)
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        (admit_steps if len(loads) > before else steps).append(dt)
        i += 1
        if all(r.finished for r in cold) and len(cold) == len(names):
            break
    engine.close()
    for n in names + [f"warm{tag}"]:
        res.unregister(n)
    res.trim()
    return {"prefetch": prefetch, "admissions": len(loads), "load_ms_median": 1e3 * statistics.median(loads),
            "load_ms_max": 1e3 * max(loads), "admit_step_ms_median": 1e3 * statistics.median(admit_steps),
            "plain_step_ms_median": 1e3 * statistics.median(steps), "loads": dict(res.loads),
            "prefetch_reads": dict(res.prefetches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", type=int, default=12, help="cold adapters arriving")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--running", type=int, default=4, help="rows decoding throughout")
    ap.add_argument("--gap", type=int, default=4, help="decode steps between arrivals")
    ap.add_argument("--new", type=int, default=8, help="tokens each cold request decodes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_causal_lm("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_adapters(model, root, args.cold, args.rank)
        size = (paths[0] / "adapter.safetensors").stat().st_size
        print(f"{args.cold} LoRA r={args.rank} adapters of {size / 1e6:.2f} MB; {args.running} rows decoding; "
              f"a cold request every {args.gap} steps; torch threads {args.threads}", flush=True)
        for rep in range(args.repeats):
            for prefetch in (0, 4):
                out = run(model, root, paths, prefetch=prefetch, running=args.running, gap=args.gap,
                          new=args.new, tag=f"r{rep}p{prefetch}x")
                print(out, flush=True)


if __name__ == "__main__":
    main()
