"""Part (b), full fine-tuning: SmolLM2-135M's block linear weights fully fine-tuned per task, compressed.

Only the transformer blocks' linear weights (attention q/k/v/o, MLP gate/up/down: 210 matrices,
106M parameters) are trained, every other parameter frozen, so the delta is exactly the 2-D
matrices the codecs are made for (embeddings, norms and the tied LM head stay the base's).
Training reads ``steps x batch`` seeded train rows (with the same seed, a superset of the 128
the LoRA adapters of ``bench/llm_tasks.py`` saw), answer tokens only, bf16 autocast, AdamW,
linear decay. The learning rate is picked among ``lrs`` by accuracy on ``n_hold`` held-out
*train* rows of the first task (rows of the train file outside the training subsample; dev is
never looked at); later tasks train once at its pick. Each task's ``dW = W_ft - W`` is
cached as safetensors (``smollm2_full_<task>_<key>`` under the bench cache), so reruns skip
training. Each codec then compresses it at part (b)'s ratios, plus the budgeted allocation,
and the decoded delta is added to the base and scored on the same dev subsample as the LoRA rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import DEFAULT_DATA, Log, TensorCache, load_avg, timer

from .config import DEFAULT_CACHE, Config
from .llm import _llm_rows, _score

__all__ = ["FullSettings", "run_llm_full", "llm_full_table", "target_summary"]

BLOCK_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclass(frozen=True)
class FullSettings:
    """The full fine-tune's budget: twice the LoRA adapters' steps at their batch size (one pass
    over the rows), and full-FT learning rates to choose from (LoRA's 2e-3 would wreck the weights).
    Every field goes into the cache key."""

    steps: int = 32
    batch_size: int = 8
    lrs: tuple[float, ...] = (1e-5, 2e-5, 5e-5)
    warmup_steps: int = 2
    max_length: int = 256
    n_hold: int = 32          # held-out train rows that pick the learning rate
    seed: int = 0

    def key(self, task: str) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "task": task, "model": "smollm2"}, sort_keys=True)
        return f"smollm2_full_{task}_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _split(task: str, s: FullSettings) -> tuple[list[dict], list[dict]]:
    """``steps x batch`` seeded train rows and ``n_hold`` seeded rows of the train file outside them."""
    import random

    from deltakit.train.instruct import read_task_file

    path = Path(DEFAULT_DATA) / task / "train.tsv"
    train = read_task_file(path, task, max_rows=s.steps * s.batch_size, seed=s.seed)
    seen = {json.dumps(ex["messages"]) for ex in train}
    rest = [ex for ex in read_task_file(path, task) if json.dumps(ex["messages"]) not in seen]
    return train, random.Random(s.seed + 1).sample(rest, min(s.n_hold, len(rest)))


def block_linear(model) -> dict[str, torch.nn.Parameter]:
    found = {n: p for n, p in model.named_parameters() if BLOCK_LINEAR.match(n)}
    if not found:
        raise ValueError("expected Llama block linear weights (model.layers.N.*_proj.weight), found none")
    return found


def _train(model, tok, weights, train: list[dict], lr: float, s: FullSettings, log: Log) -> tuple[dict, dict]:
    """Full fine-tune of the block linear weights from the base; (dW fp32, info); base restored."""
    from deltakit.train import fit
    from deltakit.train.instruct import make_instruction_loader

    params = block_linear(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    loader = make_instruction_loader(train, tok, batch_size=s.batch_size, max_length=s.max_length,
                                     shuffle=True, seed=s.seed)
    elapsed = timer(1)
    result = fit(model, loader, lr=lr, max_steps=s.steps, warmup_steps=s.warmup_steps, schedule="linear",
                 seed=s.seed, log_every=4, autocast=torch.bfloat16, params=params, progress=False)
    train_s = elapsed()
    model.eval()
    with torch.no_grad():
        dws = {n: (p.detach().float() - weights[n].float()) for n, p in params.items()}
        for n, p in params.items():
            p.copy_(weights[n])
            p.requires_grad_(False)
    info = {"lr": lr, "train_s": train_s, "train_loss": result.metrics.get("train_loss"), "load": load_avg()}
    log(f"(b-full) lr {lr}: trained {s.steps} steps in {train_s} s, train loss {info['train_loss']}")
    return dws, info


def finetune(model, tok, weights, task: str, s: FullSettings, cache: Path, log: Log) -> tuple[dict, dict]:
    """The task's cached full-FT delta, or train one per learning rate and keep the best on held-out rows."""
    store, key = TensorCache(cache), s.key(task)
    if (hit := store.get(key)) is not None:
        log(f"(b-full) {task}: reusing {store.path(key)}")
        return {n: t.float() for n, t in hit[0].items()}, hit[1]
    train, hold = _split(task, s)
    best, tried = None, []
    for lr in s.lrs:
        dws, info = _train(model, tok, weights, train, lr, s, log)
        info["hold_accuracy"] = _score(model, tok, weights, dws, hold, task)
        log(f"(b-full) {task} lr {lr}: held-out train accuracy {info['hold_accuracy']} ({len(hold)} rows)")
        tried.append(info)
        if best is None or info["hold_accuracy"] > best[1]["hold_accuracy"]:
            best = (dws, info)
    meta = {"settings": dataclasses.asdict(s), "chosen": best[1], "tried": tried, "n_train": len(train),
            "n_hold": len(hold), "hold_zero_shot": _score(model, tok, weights, None, hold, task)}
    store.put(key, best[0], meta)
    return best[0], meta


def _budget_rows(cfg: Config, model, tok, weights, dws, examples, t: str, ref: float, log: Log) -> list[dict]:
    """The size-budget allocation at part (b)'s ratios (candidates measured once on this delta)."""
    from .budgeted import budget_for
    from .encoders import scratch

    rows, tmp = [], scratch()
    run = budget_for(dws)
    try:
        for ratio in cfg.llm_ratios:
            res = run(ratio, tmp / "b")
            score = _score(model, tok, weights, res.pop("decoded"), examples, t)
            rows.append({"task": t, "codec": "budget", "target_ratio": ratio, "knobs": res["choices"],
                         "ratio_file": round(res["fp32_bytes"] / res["bytes_file"], 2),
                         "bytes_file": res["bytes_file"], "score": score, "delta_points": round(100 * (score - ref), 2),
                         "rel_error": res["rel_error"], "load": load_avg()[0]})
            log(f"(b-full) {t} budget x{rows[-1]['ratio_file']}: {score} ({rows[-1]['delta_points']:+})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run_llm_full(cfg: Config, log: Log, cache: Path | None = None, s: FullSettings = FullSettings(),
                 on_task=None) -> dict:
    """Rows per (task, codec, ratio) for the full fine-tuning deltas, as :func:`run_llm` gives for LoRA.

    The learning rate is searched on the first task's held-out train rows only; later tasks train
    once at its pick (a full fine-tune of 106M parameters costs 2-4 min a run on a shared CPU).
    ``on_task(partial)`` is called after each task, so a report survives a run stopped half way."""
    from deltakit.io.models import load_causal_lm
    from deltakit.train.instruct import read_task_file

    elapsed = timer(1)
    model, tok = load_causal_lm("smollm2")
    model.eval()
    weights = {n: p.detach().clone() for n, p in block_linear(model).items()}
    out = {"settings": dataclasses.asdict(s), "tasks": {}, "rows": [], "load_start": load_avg()}
    for i, t in enumerate(cfg.llm_tasks):
        dws, meta = finetune(model, tok, weights, t, s, Path(cache or DEFAULT_CACHE), log)
        if i == 0:
            s = dataclasses.replace(s, lrs=(meta["chosen"]["lr"],))
        examples = read_task_file(Path(DEFAULT_DATA) / t / "dev.tsv", t, max_rows=cfg.llm_dev, seed=cfg.seed)
        ref = _score(model, tok, weights, dws, examples, t)
        base = _score(model, tok, weights, None, examples, t)
        fp32 = sum(x.numel() * 4 for x in dws.values())
        out["tasks"][t] = {"full": ref, "zero_shot": base, "dense_fp32_bytes": fp32, "n_dev": len(examples),
                           "finetune": meta, "load": load_avg()[0]}
        log(f"(b-full) {t}: zero-shot {base}, full fine-tune {ref} (lr {meta['chosen']['lr']}); "
            f"dense dW {fp32 / 2**20:.1f} MiB")
        out["rows"] += _llm_rows(cfg, model, tok, weights, dws, examples, t, ref, log)
        out["rows"] += _budget_rows(cfg, model, tok, weights, dws, examples, t, ref, log)
        out["seconds"], out["load_end"] = elapsed(), load_avg()
        if on_task is not None:
            on_task(out)
    return out


def llm_full_table(full: dict) -> list[str]:
    """The LoRA table's columns, against the uncompressed full fine-tuning delta; then the 16x summary."""
    lines = ["| task | codec | knobs | x vs dense dW (on disk) | accuracy | vs full FT (pts) | rel. error | load |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for t, info in full["tasks"].items():
        lines.append(f"| {t} | zero-shot base | - | - | {info['zero_shot']:.4f} | "
                     f"{100 * (info['zero_shot'] - info['full']):+.2f} | - | - |")
        lines.append(f"| {t} | uncompressed full-FT dW (fp32) | lr={info['finetune']['chosen']['lr']} | 1 | "
                     f"{info['full']:.4f} | 0 | 0 | {info['load']} |")
        for r in (r for r in full["rows"] if r["task"] == t):
            knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items() if k != "method")
            lines.append(f"| {t} | {r['codec']} | {knobs} | {r['ratio_file']} | {r['score']:.4f} | "
                         f"{r['delta_points']:+.2f} | {r['rel_error']:.3g} | {r['load']} |")
    return lines


def target_summary(rows: list[dict], tasks: list[str], floor: float = 16) -> list[str]:
    """Per codec: its best row at >= ``floor`` x on disk per task, and whether every task is within 1 point."""
    best: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["ratio_file"] >= floor:
            per = best.setdefault(r["codec"], {})
            per[r["task"]] = max(per.get(r["task"], -1e9), r["delta_points"])
    lines = [f"| codec | best setting at >= {floor:g}x, per task (pts vs uncompressed) | worst task | meets <= 1 pt |",
             "|---|---|---:|---|"]
    for codec, per in sorted(best.items()):
        worst = min(per.values())
        ok = len(per) == len(tasks) and worst >= -1.0
        lines.append(f"| {codec} | {', '.join(f'{t} {v:+.2f}' for t, v in per.items())} | {worst:+.2f} | "
                     f"{'yes' if ok else 'no'} |")
    return lines
