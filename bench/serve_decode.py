"""One decode step of SmolLM2 with many adapters in the batch: the serving kernel at L = 1.

The decode-shaped companion of bench/serve_mixed.py (issue 17 items 2 and 7). SmolLM2-135M-Instruct
(fp32, CPU, the real model with its KV cache), random LoRA on all 7 linears of all 30 blocks with
ranks cycling 32/8/64/16 (bench/serve/setup.py's adapters, built in memory), ``--batch`` rows
(32) that have each prefilled ``--ctx`` tokens (32), then one decode step (one token per row)
timed over and over (the cache is cropped back after every step). Row ``i`` uses adapter
``a<i mod N>`` for N = 1, 8, 32 distinct adapters, through ``deltakit.mixed_batch``.

Contenders, interleaved per round (so load drift hits them alike), each a full ``no_grad``
model step: ``base`` (adapters disabled) and ``N=<n>`` for every count. Per count:

* ``ratio``: the median over rounds of the paired ratio step time / base step time;
* ``bound``: base bytes / (base bytes + the factor bytes of the N distinct adapters), the share
  of the base's speed a memory-bound step keeps (each distinct adapter read once);
* ``vs bound``: (base time / step time) / bound, the kernel's efficiency (1.0 = as fast as
  the memory traffic allows; the issue's target is 0.9 relative to the single adapter);
* ``vs single / bound``: (1-adapter time / step time) / bound, the issue's own figure.

Each figure is given for wall time and for the process's CPU time: on a loaded machine the
wall clock mostly measures the other users (a process there gets a fraction of a core), and the
CPU time is the steadier figure. The 1-minute load average is recorded with every round.
``--threads`` (default 1: on this 2-core machine shared with other agents two OpenMP threads
wait on each other whenever one is descheduled). Each round runs every contender for one
untimed *cold* step (right after another contender: caches keyed by the batch's adapters miss,
as when a serving batch changes composition; its wall time is kept) and ``--warm`` timed steps.

Before/after comparisons of a kernel change run this script from two source trees (PYTHONPATH)
alternately; ``--before OLD.json`` puts the older run's figures beside this one's in the
markdown written next to the JSON.

    python bench/serve_decode.py [--counts 1,8,32] [--batch 32] [--ctx 32] [--steps 7] [--out PATH]
                                 [--before OLD.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from _common import RESULTS, interleaved, machine_info, paired_ratio, read_json, write_json, write_text
from serve.setup import N_LAYERS, TARGETS, _randomize, param_bytes, rank_of

DEFAULT_OUT = RESULTS / "serve_decode.json"


def _model(n_adapters: int):
    """SmolLM2 with ``a0 .. a<n-1>`` attached (random factors, seeded like the serve benchmark)."""
    import deltakit as dk
    from deltakit.io.models import load_causal_lm

    model, _ = load_causal_lm("smollm2")
    model.eval()
    base_bytes = param_bytes(model.parameters())
    sizes = {}
    for k in range(n_adapters):
        r = rank_of(k)
        ad = dk.attach(model, dk.LoraConfig(r=r, alpha=2.0 * r, targets=("re:" + TARGETS,)), name=f"a{k}")
        if sum(1 for _ in ad.deltas()) != N_LAYERS:
            raise RuntimeError(f"expected LoRA on {N_LAYERS} SmolLM2 linears")
        _randomize(ad, k)
        sizes[f"a{k}"] = param_bytes(ad.parameters())
    return model, base_bytes, sizes


def _prefill(model, batch: int, ctx: int):
    """A KV cache of ``ctx`` tokens per row (base weights; the decode step is what is timed)."""
    import deltakit as dk

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, ctx), generator=g)
    with torch.no_grad(), dk.disabled(model):
        out = model(input_ids=ids, use_cache=True)
    last = out.logits[:, -1].argmax(-1, keepdim=True)             # (B, 1)
    return out.past_key_values, last


def _stepper(model, cache, last, ctx: int, rows: list[str] | None, warm: int):
    """A callable running ``1 + warm`` decode steps (rows: adapter per row; None: the base),
    cropping the cache back after each. It returns (wall s, CPU s) averaged over the ``warm``
    steps (the steady state of a stable batch) and keeps the first step's wall time in
    ``.cold`` (the step right after another contender ran: caches keyed by the batch's
    adapters miss there, as when a serving batch changes composition)."""
    import deltakit as dk

    batch = last.shape[0]
    mask = torch.ones(batch, ctx + 1, dtype=torch.long)
    pos = torch.full((batch, 1), ctx, dtype=torch.long)

    def one():
        scope = dk.disabled(model) if rows is None else dk.mixed_batch(model, rows)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), scope:
            model(input_ids=last, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        cache.crop(-1)                                            # back to ctx tokens
        return wall, cpu

    def step():
        step.cold.append(one()[0])
        runs = [one() for _ in range(warm)]
        return sum(w for w, _ in runs) / warm, sum(c for _, c in runs) / warm
    step.cold = []
    return step


def run(counts=(1, 8, 32), *, batch: int = 32, ctx: int = 32, steps: int = 7, warmup: int = 1, warm: int = 2,
        threads: int = 1, out_path=DEFAULT_OUT, log=print) -> dict:
    torch.set_num_threads(threads)
    t0 = time.time()
    model, base_bytes, sizes = _model(max(counts))
    cache, last = _prefill(model, batch, ctx)
    log(f"built in {time.time() - t0:.0f}s; load {os.getloadavg()[0]:.2f}")
    rows = {n: [f"a{i % n}" for i in range(batch)] for n in counts}
    fns = {"base": _stepper(model, cache, last, ctx, None, warm)}
    fns.update({f"N={n}": _stepper(model, cache, last, ctx, rows[n], warm) for n in counts})
    res = interleaved(fns, steps, warmup)
    cases = [_case(res, n, rows[n], base_bytes, sizes, counts) for n in counts]
    cold = {k: statistics.median(f.cold[warmup:]) for k, f in fns.items()}
    for c in cases:
        c["cold_median_s"] = round(cold[f"N={c['distinct']}"], 4)
        c["cold_ratio"] = round(cold[f"N={c['distinct']}"] / res["median_s"]["base"], 3)
    loads = res["loadavg_1m"]
    out = {"machine": machine_info("transformers"),
           "settings": {"batch": batch, "ctx": ctx, "steps": steps, "warmup": warmup, "warm": warm, "threads": threads,
                        "dtype": "fp32", "ranks": "cycling 32/8/64/16", "counts": list(counts)},
           "base_bytes": base_bytes, "base_median_s": res["median_s"]["base"], "base_median_cpu_s": res["median_cpu_s"]["base"], "cases": cases,
           "loadavg_1m": loads, "load_range": [round(min(loads), 2), round(max(loads), 2)],
           "times_s": res["times_s"], "cpu_s": res["cpu_s"], "wall_s": round(time.time() - t0, 1)}
    for c in cases:
        log(f"N={c['distinct']}: wall {c['median_s'] * 1e3:.0f} ms/step = {c['ratio']:.3f}x base; CPU "
            f"{c['median_cpu_s'] * 1e3:.0f} ms = {c['cpu_ratio']:.3f}x base; bound {c['bound']:.3f}; vs bound "
            f"{c['vs_bound']:.2f} (CPU {c['vs_bound_cpu']:.2f}); vs single/bound {c['vs_single_over_bound']} "
            f"(CPU {c['vs_single_over_bound_cpu']}); cold step {c['cold_median_s'] * 1e3:.0f} ms ({c['cold_ratio']:.2f}x)")
    log(f"base wall {res['median_s']['base'] * 1e3:.0f} ms/step, CPU {res['median_cpu_s']['base'] * 1e3:.0f} ms; "
        f"load {out['load_range']}; threads {threads}")
    if out_path is not None:
        write_json(out_path, out)
    return out


def _case(res: dict, n: int, rows: list[str], base_bytes: int, sizes: dict, counts) -> dict:
    distinct = sorted(set(rows))
    adapter_bytes = sum(sizes[a] for a in distinct)
    bound = base_bytes / (base_bytes + adapter_bytes)
    ratio = paired_ratio(res, f"N={n}", "base")
    cpu_ratio = paired_ratio(res, f"N={n}", "base", "cpu_s")
    vs_single = vs_single_cpu = None
    if 1 in counts:                                              # step time / single-adapter step time
        vs_single = round(1 / paired_ratio(res, f"N={n}", "N=1") / bound, 3)
        vs_single_cpu = round(1 / paired_ratio(res, f"N={n}", "N=1", "cpu_s") / bound, 3)
    return {"distinct": n, "adapter_bytes": adapter_bytes, "bound": round(bound, 4),
            "median_s": res["median_s"][f"N={n}"], "ratio": round(ratio, 4),
            "cpu_ratio": round(cpu_ratio, 4), "median_cpu_s": res["median_cpu_s"][f"N={n}"],
            "vs_bound": round(1 / ratio / bound, 3), "vs_single_over_bound": vs_single,
            "vs_bound_cpu": round(1 / cpu_ratio / bound, 3), "vs_single_over_bound_cpu": vs_single_cpu,
            "spread_s": [round(min(res["times_s"][f"N={n}"]), 4), round(statistics.median(res["times_s"][f"N={n}"]), 4),
                         round(max(res["times_s"][f"N={n}"]), 4)]}


def markdown(res: dict, before: dict | None = None) -> str:
    """The run as a table, with an earlier run (``before``: another source tree) beside it."""
    s = res["settings"]
    lines = ["# One SmolLM2 decode step with many adapters (bench/serve_decode.py)", "",
             f"SmolLM2-135M-Instruct, fp32, {s['batch']} rows x 1 token after {s['ctx']} cached, LoRA on all 210 "
             f"linears (ranks {s['ranks']}), row i -> adapter i mod N; `torch.set_num_threads({s['threads']})`; "
             f"medians over {s['steps']} interleaved rounds of paired ratios to the base step ({s['warm']} warm steps "
             "per round). *bound*: base bytes / (base + the N adapters' factor bytes); *vs bound*: (base time / "
             "step time) / bound. The base step at 32 rows is not purely memory-bound on this CPU, so *vs bound* "
             "can exceed 1. CPU-time figures first (the steadier under load), wall time in brackets.", ""]
    runs = [("before", before), ("after", res)] if before else [("this run", res)]
    lines += ["| run | N distinct | bound | step / base (CPU) | vs bound (CPU) | vs single / bound (CPU) | "
              "cold step / base (wall) | base CPU ms | load 1m |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in runs:
        for c in r["cases"]:
            lines.append(f"| {name} | {c['distinct']} | {c['bound']:.3f} | {c['cpu_ratio']:.2f}x ({c['ratio']:.2f}x) | "
                         f"{c['vs_bound_cpu']:.2f} ({c['vs_bound']:.2f}) | {c['vs_single_over_bound_cpu']} "
                         f"({c['vs_single_over_bound']}) | {c['cold_ratio']:.2f}x | "
                         f"{r['base_median_cpu_s'] * 1e3:.0f} | {r['load_range'][0]}-{r['load_range'][1]} |")
    m = res["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
                  f"transformers {m.get('transformers')}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", default="1,8,32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=32)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--warm", type=int, default=2, help="timed steps per round after the untimed cold one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--before", default=None, help="an earlier run's JSON to set beside this one in the markdown")
    a = p.parse_args(argv)
    import deltakit
    print(f"deltakit from {deltakit.__file__}")
    res = run(tuple(int(c) for c in a.counts.split(",")), batch=a.batch, ctx=a.ctx, steps=a.steps, warmup=a.warmup,
        warm=a.warm, threads=a.threads, out_path=a.out)
    text = markdown(res, read_json(a.before) if a.before else None)
    write_text(os.path.splitext(a.out)[0] + ".md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
