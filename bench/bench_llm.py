"""LLM cost on CPU: LoRA SFT (deltakit vs peft vs full fine-tuning, and ``fit(compile=True)``)
and generation throughput (base, unmerged, merged, a batch mixing 8 adapters), in one run.

Model: SmolLM2-135M-Instruct (``deltakit.io.models.load_causal_lm("smollm2")``, offline,
from the dequantised cache; fp32 master weights). ``--quick`` runs a tiny random Llama of the
same architecture instead, so the smoke run takes seconds and needs no model package.

Training (batch 8 x 256 random tokens, labels = inputs, bf16 autocast, AdamW, forward +
backward + step, all as ``deltakit.train.fit`` does one step):

* ``deltakit_lora`` / ``peft_lora``: r=16, alpha=32, dropout 0 on every linear layer of every
  block (q, k, v, o, gate, up, down), adapter weights fp32 (both libraries' default);
* ``full_ft``: every parameter trained;
* ``frozen_floor``: only the first block's input norm trained, so backward runs through every
  block (input gradients) with no weight gradient and no adapter: what any LoRA step costs at
  least, whatever the library. ``floor/peft`` bounds how far below peft a LoRA step can go;
* ``deltakit_lora_compiled``: ``deltakit_lora`` through ``deltakit.train.compile_model``, the
  helper behind ``fit(compile=True)`` / ``deltakit train --compile`` (``torch.compile``,
  inductor). Its first steps compile (their time is reported as ``compile_warmup_s``).

Timing: every contender lives in one process and they are interleaved step by step (round
``i`` runs each once) after warm-up rounds; medians and the median of per-round paired ratios
are reported, so load from other users hits every contender alike. Wall and process-CPU time
are both kept (CPU time is less disturbed by other processes). ``os.getloadavg()`` is
recorded with every round.

Peak memory: PyTorch's CPU allocator is invisible to ``tracemalloc`` and torch has no CPU
counterpart of ``torch.cuda.max_memory_allocated``, so we measure what the kernel charges:
each contender trains in a fresh subprocess; the baseline is the RSS after the model,
adapter and optimiser are built, the peak is the kernel's high-water mark (``VmHWM``) over
the training steps, reset just before them with ``/proc/self/clear_refs`` (else
``ru_maxrss``). ``peak - baseline`` is what training adds (activations, gradients, AdamW).

Generation (greedy, ``deltakit.train.generate_ids``, 8 prompts of random tokens, no EOS so
every row runs to ``max_new_tokens``): ``base`` (the model with no adapter), ``unmerged`` (a
copy with 8 LoRAs attached, every row through the active one: the plain path), ``merged``
(that adapter merged into the copy) and ``mixed_8`` (the copy, row i with adapter i: the
batched mixed path; "single" in the ratios is ``unmerged``). Rounds are interleaved.
Tokens/s is reported end to end (prefill included) and for the decode steps alone (the
model's forward calls after the prefill, timed by forward hooks).

The mixed-8 bound: a decode step on CPU at batch 8 is memory bound, so relative to one
adapter, mixing 8 can at best run at bytes(base) / (bytes(base) + bytes(8 adapters' factors))
(every factor is read once per step), computed from the real tensors' byte counts (tied
weights counted once).

Memory: the train section holds the base and one copy per contender in one process (about
5 GB resident for SmolLM2 with full fine-tuning's gradients and AdamW state): on a machine
shared with other jobs, run ``--sections train`` / ``memory`` / ``generation`` separately if
need be (each rewrites the JSON it is given with what it ran).

    python bench/bench_llm.py [--quick] [--steps N] [--rounds N] [--sections train,memory,generation]
                              [--out bench/results/llm.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _common import (RESULTS, interleaved, machine_info, paired_ratio, reset_peak_rss, status_kb, write_json,
                     write_text)

DEFAULT_OUT = RESULTS / "llm.json"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 16, 32
TRAIN = ("deltakit_lora", "peft_lora", "full_ft", "frozen_floor", "deltakit_lora_compiled")
MEMORY = ("deltakit_lora", "peft_lora", "full_ft")
GEN = ("base", "unmerged", "merged", "mixed_8")
N_MIXED = 8
TARGETS = {"deltakit/peft train step": ("<=", 0.9), "unmerged/merged tokens/s": (">=", 0.9),
           "mixed_8/single tokens/s over the bound": (">=", 0.9)}


# ----------------------------------------------------------------------------- models
def _base(model: str) -> torch.nn.Module:
    """SmolLM2 (fp32 as stored) or, for ``tiny``, a seeded random Llama of the same shape family."""
    if model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    from deltakit.io.models import load_causal_lm

    return load_causal_lm(model)[0]


def _deltakit_lora(model: torch.nn.Module, name: str = "default", seed: int = 0):
    """Attach a deltakit LoRA; B gets small random values (as a trained adapter would have) so
    merged and unmerged really differ from the base."""
    import deltakit as dk

    ad = dk.attach(model, dk.LoraConfig(r=R, alpha=ALPHA, targets=LINEAR), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, d in ad.deltas():
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.01)
    return ad


def _train_model(variant: str, base: torch.nn.Module) -> tuple[torch.nn.Module, list]:
    """-> (the module to call, the parameters AdamW trains) for a training contender."""
    model = copy.deepcopy(base)
    if variant.startswith("deltakit_lora"):
        ad = _deltakit_lora(model)
        params = list(ad.parameters())
        if variant.endswith("compiled"):
            from deltakit.train import compile_model

            model = compile_model(model)
        return model, params
    if variant == "peft_lora":
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(LINEAR),
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]
    if variant in ("full_ft", "frozen_floor"):
        first_norm = model.model.layers[0].input_layernorm.weight
        for p in model.parameters():
            p.requires_grad_(variant == "full_ft" or p is first_norm)
        return model, [p for p in model.parameters() if p.requires_grad]
    raise ValueError(f"expected a variant in {TRAIN}, found {variant!r}")


def _batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train_step(model, opt, batch) -> tuple[float, float]:
    """One fit-style step (bf16 autocast forward + loss, backward, AdamW); -> (wall s, CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss.float()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------- timing
def _time_train(base, variants: tuple[str, ...], batch: int, seq: int, warmup: int, steps: int, log) -> dict:
    data = _batch(base.config.vocab_size, batch, seq)
    fns, warm, failed = {}, {}, {}
    for v in variants:
        model, params = _train_model(v, base)
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-5)
        fns[v] = (lambda m=model, o=opt: _train_step(m, o, data))
        t0 = time.perf_counter()
        try:
            for _ in range(warmup + (1 if v.endswith("compiled") else 0)):  # compile: no compiling in timed rounds
                fns[v]()
        except Exception as e:  # noqa: BLE001 - a compiler failure is a finding to report, not the end of the run
            if not v.endswith("compiled"):
                raise
            failed[v] = f"{type(e).__name__}: {next(iter(str(e).strip().splitlines()), '')[:300]}"
            log(f"train {v}: torch.compile failed ({failed[v]}); timing the others")
            del fns[v]
            continue
        warm[v] = time.perf_counter() - t0
        log(f"train {v}: built and warmed up in {warm[v]:.1f}s")
    res = interleaved(fns, steps)
    res["warmup_s"], res["failed"] = warm, failed
    pairs = {"deltakit/peft train step": ("deltakit_lora", "peft_lora"),
             "deltakit LoRA/full FT train step": ("deltakit_lora", "full_ft"),
             "peft LoRA/full FT train step": ("peft_lora", "full_ft"),
             "frozen floor/peft train step": ("frozen_floor", "peft_lora"),
             "frozen floor/deltakit train step": ("frozen_floor", "deltakit_lora"),
             "compiled/eager deltakit LoRA train step": ("deltakit_lora_compiled", "deltakit_lora")}
    pairs = {k: ab for k, ab in pairs.items() if all(x in fns for x in ab)}
    res["ratios"] = {k: paired_ratio(res, a, b) for k, (a, b) in pairs.items()}
    res["cpu_ratios"] = {k: paired_ratio(res, a, b, "cpu_s") for k, (a, b) in pairs.items()}
    return res


# ----------------------------------------------------------------------------- memory
def _memory_child(variant: str, model: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import gc
    import resource

    import psutil

    torch.set_num_threads(threads)
    net, params = _train_model(variant, _base(model))
    net.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = _batch(net.config.vocab_size, batch, seq)
    gc.collect()
    reset = reset_peak_rss()
    rss0 = psutil.Process().memory_info().rss
    for _ in range(steps):
        _train_step(net, opt, data)
    if reset:
        peak, how = status_kb("VmHWM") * 1024, "VmHWM after clear_refs"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (includes loading)"
    return {"variant": variant, "steps": steps, "peak_source": how, "baseline_rss_mb": rss0 / 2**20,
            "peak_rss_mb": peak / 2**20, "peak_delta_mb": (peak - rss0) / 2**20,
            "trainable_params": sum(p.numel() for p in params), "loadavg_1m": os.getloadavg()[0]}


def _memory(variant: str, model: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant, "--model", model,
           "--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- generation
class _ForwardTimer:
    """Wall time of each root forward call of a model (prefill first, then one per decode step)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[float] = []
        model.register_forward_pre_hook(lambda *_: setattr(self, "t0", time.perf_counter()))
        model.register_forward_hook(lambda *_: self.calls.append(time.perf_counter() - self.t0))


def _gen_models(base: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, object, Callable]]:
    """variant -> (model, the ``adapters`` argument of generate_ids, a context to run it in).

    Two models in memory, not one per variant (a loaded shared machine killed a run holding
    five SmolLM2 copies): the loaded base itself, and one copy carrying the 8 adapters with
    ``a0`` active. ``merged`` merges ``a0`` into that copy for its turn and unmerges it after
    (exact: the original weights are restored from the stash)."""
    import contextlib

    import deltakit as dk

    eight = copy.deepcopy(base)
    names = [f"a{i}" for i in range(N_MIXED)]
    for i, n in enumerate(names):
        _deltakit_lora(eight, n, seed=i)
    dk.set_active(eight, "a0")
    a0 = dk.get_adapter(eight, "a0")

    @contextlib.contextmanager
    def merged():
        a0.merge()
        try:
            yield
        finally:
            a0.unmerge()

    plain = contextlib.nullcontext
    return {"base": (base, None, plain), "unmerged": (eight, None, plain), "merged": (eight, None, merged),
            "mixed_8": (eight, names, plain)}


def _gen_once(model, timer: _ForwardTimer, adapters, prompts: list[list[int]], new: int) -> dict:
    from deltakit.train.generate import generate_ids

    timer.calls.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    out = generate_ids(model, prompts, adapters=adapters, max_new_tokens=new, batch_size=len(prompts),
                       eos_token_id=None, pad_token_id=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(o) for o in out)
    decode = sum(timer.calls[1:])
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "decode_s": decode,
            "decode_tokens": tokens - len(prompts)}


def _time_generation(base, batch: int, prompt_len: int, new: int, rounds: int, log) -> dict:
    models = _gen_models(base)
    timers = {id(m): _ForwardTimer(m) for m, _, _ in models.values()}
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(10, base.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    runs = {v: [] for v in models}
    loads = []
    for r in range(rounds + 1):  # round 0 warms up
        loads.append(os.getloadavg()[0])
        for v, (m, adapters, scope) in models.items():
            with scope():
                res = _gen_once(m, timers[id(m)], adapters, prompts, new)
            if r:
                runs[v].append(res)
        log(f"generation round {r}{' (warm-up)' if r == 0 else ''} done")
    tps = {v: [x["tokens"] / x["wall_s"] for x in rs] for v, rs in runs.items()}
    dps = {v: [x["decode_tokens"] / x["decode_s"] for x in rs] for v, rs in runs.items()}
    ratio = lambda d, a, b: statistics.median(x / y for x, y in zip(d[a], d[b]))  # noqa: E731
    pairs = {"unmerged/merged tokens/s": ("unmerged", "merged"), "unmerged/base tokens/s": ("unmerged", "base"),
             "merged/base tokens/s": ("merged", "base"), "mixed_8/single tokens/s": ("mixed_8", "unmerged")}
    return {"runs": runs, "loadavg_1m": loads,
            "tokens_per_s": {v: statistics.median(x) for v, x in tps.items()},
            "decode_tokens_per_s": {v: statistics.median(x) for v, x in dps.items()},
            "ratios": {k: ratio(tps, a, b) for k, (a, b) in pairs.items()},
            "decode_ratios": {k: ratio(dps, a, b) for k, (a, b) in pairs.items()},
            "bound": _traffic_bound(models["mixed_8"][0], models["mixed_8"][1])}


def _unique_bytes(tensors) -> int:
    """Bytes of distinct storages (a tied embedding / LM head counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _traffic_bound(model: torch.nn.Module, names: list[str]) -> dict:
    """bytes(base) / (bytes(base) + bytes(the adapters' factors)): the tokens/s a decode step
    mixing these adapters can reach relative to one adapter if it is memory bound."""
    import deltakit as dk

    adapter = [p for n in names for p in dk.get_adapter(model, n).parameters()]
    ids = {id(p) for p in adapter}
    base = _unique_bytes(p for p in model.parameters() if id(p) not in ids)
    factors = _unique_bytes(adapter)
    return {"base_bytes": base, "adapters_bytes": factors, "adapters": len(names),
            "bound": base / (base + factors)}


# ----------------------------------------------------------------------------- report
def _mark(key: str, value: float) -> str:
    op, tgt = TARGETS[key]
    ok = value <= tgt if op == "<=" else value >= tgt
    return f"{op} {tgt} {'ok' if ok else 'MISSED'}"


def markdown(res: dict) -> str:
    """The report: header with machine and load, then a table per section that ran."""
    s, m = res["settings"], res["machine"]
    lines = [f"# LLM bench: {s['model']}, {m['cpu']}, {s['threads']} threads, torch {m['torch']}, "
             f"peft {m.get('peft')}", "",
             f"Load average (1 min) at start {res['loadavg_start'][0]:.2f}, end {res['loadavg_end'][0]:.2f}; "
             f"{'QUICK smoke run, figures meaningless' if s['quick'] else 'medians of interleaved rounds'}; "
             f"sections: {', '.join(res.get('sections', SECTIONS))}.", ""]
    if "train" in res:
        lines += _train_table(res)
    if "generation" in res:
        lines += _generation_table(res)
    lines += _ratio_table(res)
    if res.get("compile_error"):
        lines += ["", f"torch.compile failed: {res['compile_error']}"]
    return "\n".join(lines)


def _train_table(res: dict) -> list[str]:
    s, tr, mem = res["settings"], res["train"], res.get("memory", {})
    lines = [f"## SFT step: batch {s['batch']} x {s['seq']}, bf16 autocast, AdamW, LoRA r={R} on {', '.join(LINEAR)}",
             "", "| contender | step (s) | CPU (s) | trainable params | peak RSS delta (MB) | baseline RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for v, t in tr["median_s"].items():
        mm = mem.get(v, {})
        lines.append(f"| {v} | {t:.3f} | {tr['median_cpu_s'][v]:.3f} | {mm.get('trainable_params', '')} | "
                     f"{mm.get('peak_delta_mb', float('nan')):.0f} | {mm.get('baseline_rss_mb', float('nan')):.0f} |")
    return lines + [""]


def _generation_table(res: dict) -> list[str]:
    s, gen = res["settings"], res["generation"]
    lines = [f"## Generation: greedy, batch {s['gen_batch']}, prompt {s['prompt_len']} + {s['new_tokens']} "
             "new tokens", "", "| variant | tokens/s (end to end) | decode tokens/s |", "|---|---:|---:|"]
    for v in gen["tokens_per_s"]:
        lines.append(f"| {v} | {gen['tokens_per_s'][v]:.1f} | {gen['decode_tokens_per_s'][v]:.1f} |")
    b = gen["bound"]
    return lines + ["", f"Mixed-{b['adapters']} traffic bound: base {b['base_bytes'] / 2**20:.1f} MiB, "
                    f"{b['adapters']} adapters' factors {b['adapters_bytes'] / 2**20:.1f} MiB -> bound "
                    f"{b['bound']:.3f}", ""]


def _ratio_table(res: dict) -> list[str]:
    lines = ["## Ratios (median of paired rounds) and targets", "", "| ratio | wall | CPU / decode-only | target |",
             "|---|---:|---:|---|"]
    for sec, other in (("train", "cpu_ratios"), ("generation", "decode_ratios")):
        for k, v in res.get(sec, {}).get("ratios", {}).items():
            lines.append(f"| {k} | {v:.3f} | {res[sec][other][k]:.3f} | {_mark(k, v) if k in TARGETS else ''} |")
    if "mixed_over_bound" in res:
        over, key = res["mixed_over_bound"], "mixed_8/single tokens/s over the bound"
        lines.append(f"| {key} | {over['end_to_end']:.3f} | {over['decode']:.3f} | {_mark(key, over['end_to_end'])} |")
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "train" in res:
        panels.append(("train step (s, median)", res["train"]["median_s"]))
    if "memory" in res:
        panels.append(("peak RSS added by training (MB)", {v: x["peak_delta_mb"] for v, x in res["memory"].items()}))
    if "generation" in res:
        panels.append(("decode tokens/s (median)", res["generation"]["decode_tokens_per_s"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        ax.barh(list(values), list(values.values()))
        ax.set_xlabel(label)
    fig.suptitle(f"{res['settings']['model']}: load {res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver
def _settings(a: argparse.Namespace) -> dict:
    q = a.quick
    return {"model": a.model or ("tiny" if q else "smollm2"), "quick": q, "threads": a.threads,
            "batch": a.batch or (2 if q else 8), "seq": a.seq or (32 if q else 256), "warmup": 1,
            "steps": a.steps or (2 if q else 5),
            "mem_steps": 2, "gen_batch": N_MIXED, "prompt_len": 8 if q else 16,
            "new_tokens": a.new_tokens or (4 if q else 32), "rounds": a.rounds or (1 if q else 3), "compile": a.compile or not (q or a.no_compile),
            "r": R, "alpha": ALPHA, "targets": list(LINEAR)}


def _train_section(res: dict, base, s: dict, log) -> None:
    """Timed steps of every contender; a torch.compile failure is recorded, not fatal."""
    variants = TRAIN if s["compile"] else TRAIN[:-1]
    res["train"] = _time_train(base, variants, s["batch"], s["seq"], s["warmup"], s["steps"], log)
    if res["train"]["failed"]:
        res["compile_error"] = next(iter(res["train"]["failed"].values()))


def _generation_section(res: dict, base, s: dict, log) -> None:
    base.eval()
    gen = res["generation"] = _time_generation(base, s["gen_batch"], s["prompt_len"], s["new_tokens"],
                                               s["rounds"], log)
    bound = gen["bound"]["bound"]
    res["mixed_over_bound"] = {"end_to_end": gen["ratios"]["mixed_8/single tokens/s"] / bound,
                               "decode": gen["decode_ratios"]["mixed_8/single tokens/s"] / bound}


def _memory_section(res: dict, base, s: dict, log) -> None:
    res["memory"] = {v: _memory(v, s["model"], s["mem_steps"], s["batch"], s["seq"], s["threads"]) for v in MEMORY}


SECTIONS = {"train": _train_section, "memory": _memory_section, "generation": _generation_section}


def run(a: argparse.Namespace) -> dict:
    """Run the sections, rewriting ``<out>.json`` after each (a late failure loses nothing),
    then ``.md`` and ``.png``; return the results."""
    from _common import Log

    s = _settings(a)
    torch.set_num_threads(s["threads"])
    log = Log()
    res = {"machine": machine_info("transformers", "peft"), "loadavg_start": os.getloadavg(), "settings": s,
           "targets": {k: list(v) for k, v in TARGETS.items()}, "sections": list(a.sections), "complete": False}
    t0 = time.time()
    base = _base(s["model"])
    log(f"loaded {s['model']}")
    out = Path(a.out)
    for name in a.sections:
        SECTIONS[name](res, base, s, log)
        res["loadavg_end"], res["wall_s"] = os.getloadavg(), time.time() - t0
        write_json(out, res)
        log(f"{name} done")
    res["complete"] = True
    write_json(out, res)
    text = markdown(res)
    write_text(out.with_suffix(".md"), text + "\n")
    print(text)
    try:
        plot(res, out.with_suffix(".png"))
    except ModuleNotFoundError as e:  # matplotlib comes with the 'bench' extra; the figures above stand
        print(f"no plot written: {e.name} is not installed (pip install 'deltakit[bench]')")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the .md and .png go next to it")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny random Llama, tiny sizes (seconds)")
    p.add_argument("--model", default=None, help="smollm2 (default), tiny, or a causal LM directory")
    p.add_argument("--steps", type=int, default=None, help="timed train rounds (default 5, quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed generation rounds (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", default=",".join(SECTIONS), type=lambda v: v.split(","),
                   help=f"which parts to run, comma-separated (default {','.join(SECTIONS)})")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    p.add_argument("--compile", action="store_true", help="time the torch.compile contender with --quick too "
                                                           "(compiling takes minutes; off in quick runs)")
    p.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help="train batch size (default 8, quick 2)")
    p.add_argument("--seq", type=int, default=None, help="train tokens per row (default 256, quick 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 32, quick 4)")
    a = p.parse_args(argv)
    unknown = [x for x in a.sections if x not in SECTIONS]
    if unknown:
        p.error(f"expected sections among {list(SECTIONS)}, found {unknown}")
    if a.memory_child:
        print(json.dumps(_memory_child(a.memory_child, a.model or "smollm2", a.steps or 3, a.batch or 8,
                                       a.seq or 256, a.threads)))
        return 0
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
