"""Part (b): SmolLM2 LoRA deltas (the per-task adapters ``bench/llm_tasks.py`` trains), compressed.

Each adapter's dense ``dW`` per target layer is compressed by every codec at each ratio (ratio
against the dense fp32 ``dW``; the adapter file's own ratio is given beside it, since LoRA is a
compression already), merged into the base weights and scored by greedy generation on a dev
subsample, against the uncompressed adapter merged the same way.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from _common import DEFAULT_DATA, Log, load_avg

from .config import Config
from .encoders import compress_delta, dir_bytes, plan, scratch
from .sweep import codec_names, _ratios

__all__ = ["run_llm", "llm_table"]


def _adapter_dirs(cfg: Config) -> dict[str, Path]:
    root = Path(cfg.llm_dir)
    found = {t: root / t for t in cfg.llm_tasks if (root / t / "adapter.json").is_file()}
    return found


def _score(model, tok, weights: dict[str, torch.Tensor], dw: dict[str, torch.Tensor] | None, examples, task) -> float:
    from deltakit.train.gen_eval import evaluate_generation

    with torch.no_grad():
        for n, w in weights.items():
            model.get_parameter(n).copy_(w + dw[n].to(w.dtype) if dw and n in dw else w)
    return round(evaluate_generation(model, tok, examples, task=task, max_new_tokens=4, batch_size=16)["accuracy"], 4)


def run_llm(cfg: Config, log: Log) -> dict:
    """Rows per (task, codec, ratio); {} when no adapters were made (run bench/llm_tasks.py first)."""
    import deltakit
    from deltakit.io.models import load_causal_lm
    from deltakit.taskvec import TaskVector
    from deltakit.train.instruct import read_task_file

    dirs = _adapter_dirs(cfg)
    if not dirs:
        log(f"(b) skipped: no adapters under {cfg.llm_dir} (bench/llm_tasks.py makes them)")
        return {"skipped": f"no adapters under {cfg.llm_dir}"}
    model, tok = load_causal_lm("smollm2")
    model.eval()
    out = {"tasks": {}, "rows": []}
    for t, d in dirs.items():
        ad = deltakit.load_adapter(model, d, name=t)
        tv = TaskVector.from_adapter(ad)
        dws = {n: tv.dense(n, torch.float32) for n in tv.keys()}
        deltakit.detach(model, t)
        weights = {n: model.get_parameter(n).detach().clone() for n in dws}
        examples = read_task_file(Path(DEFAULT_DATA) / t / "dev.tsv", t, max_rows=cfg.llm_dev, seed=cfg.seed)
        ref = _score(model, tok, weights, dws, examples, t)
        base = _score(model, tok, weights, None, examples, t)
        fp32 = sum(x.numel() * 4 for x in dws.values())
        out["tasks"][t] = {"lora": ref, "zero_shot": base, "dense_fp32_bytes": fp32,
                           "adapter_file_bytes": dir_bytes(d), "n_dev": len(examples)}
        log(f"(b) {t}: zero-shot {base}, LoRA {ref}; dense dW {fp32 / 2**20:.1f} MiB, adapter "
            f"{dir_bytes(d) / 2**20:.1f} MiB")
        out["rows"] += _llm_rows(cfg, model, tok, weights, dws, examples, t, ref, log)
        with torch.no_grad():
            for n, w in weights.items():
                model.get_parameter(n).copy_(w)
    return out


def _llm_rows(cfg, model, tok, weights, dws, examples, t, ref, log) -> list[dict]:
    rows, tmp = [], scratch()
    try:
        for codec in codec_names(cfg):
            for ratio in (cfg.llm_ratios if _ratios(cfg, codec)[0] else [None]):
                knobs = plan(codec, ratio, dws) if ratio else {}
                if knobs is None:
                    continue
                res = compress_delta(dws, codec, knobs, tmp / "c")
                score = _score(model, tok, weights, res.pop("decoded"), examples, t)
                rows.append({"task": t, "codec": codec, "target_ratio": ratio, "knobs": knobs,
                             "ratio_file": round(res["fp32_bytes"] / res["bytes_file"], 2),
                             "bytes_file": res["bytes_file"], "score": score,
                             "delta_points": round(100 * (score - ref), 2), "rel_error": res["rel_error"],
                             "load": load_avg()[0]})
                log(f"(b) {t} {codec} x{rows[-1]['ratio_file']}: {score} ({rows[-1]['delta_points']:+})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the last compressed file (up to ~50 MB on SmolLM2)
    return rows


def llm_table(llm: dict) -> list[str]:
    if "skipped" in llm:
        return [f"Skipped: {llm['skipped']}."]
    lines = ["| task | codec | knobs | x vs dense dW (on disk) | accuracy | vs LoRA (pts) | rel. error |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t, info in llm["tasks"].items():
        lines.append(f"| {t} | zero-shot base | - | - | {info['zero_shot']:.4f} | "
                     f"{100 * (info['zero_shot'] - info['lora']):+.2f} | - |")
        lines.append(f"| {t} | LoRA adapter file | - | {info['dense_fp32_bytes'] / info['adapter_file_bytes']:.1f} | "
                     f"{info['lora']:.4f} | 0 | 0 |")
        for r in (r for r in llm["rows"] if r["task"] == t):
            knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items())
            lines.append(f"| {t} | {r['codec']} | {knobs} | {r['ratio_file']} | {r['score']:.4f} | "
                         f"{r['delta_points']:+.2f} | {r['rel_error']:.3g} |")
    return lines
