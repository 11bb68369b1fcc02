"""The codec x ratio sweep over the MiniLM deltas (part a) and merges of compressed deltas (part c)."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from _common import Log, load_avg

from .config import Config
from .encoders import Scorer, compress_delta, plan, scratch

__all__ = ["sweep_encoder", "merge_compressed", "codec_names"]


def codec_names(cfg: Config) -> list[str]:
    from deltakit.compress import list_compressors

    names = [c.name for c in list_compressors()]
    return [n for n in names if cfg.codecs is None or n in cfg.codecs]


def _row(task: str, codec: str, ratio: float | None, knobs: dict, res: dict, score: float, ref: float) -> dict:
    return {"task": task, "codec": codec, "target_ratio": ratio, "knobs": knobs,
            "ratio_file": round(res["fp32_bytes"] / res["bytes_file"], 2),
            "ratio_parts": round(res["fp32_bytes"] / max(1, res["bytes_parts"]), 2),
            "bytes_file": res["bytes_file"], "score": score, "delta_points": round(100 * (score - ref), 2),
            "rel_error": res["rel_error"], "encode_gbps": res["encode_gbps"], "decode_gbps": res["decode_gbps"],
            "load": load_avg()[0]}


def sweep_encoder(cfg: Config, tasks, tvs, heads, scorer: Scorer, refs: Mapping[str, float], log: Log,
                  budget: Callable | None) -> list[dict]:
    """Every codec at every ratio on every task (plus the budgeted allocation when given)."""
    rows, tmp = [], scratch()
    try:
        for t, td in tasks.items():
            for codec in codec_names(cfg):
                for ratio in _ratios(cfg, codec):
                    knobs = plan(codec, ratio, tvs[t]) if ratio is not None else {}
                    if knobs is None:
                        log(f"  {t} {codec} x{ratio}: not reachable, skipped")
                        continue
                    res = compress_delta(tvs[t], codec, knobs, tmp / "c")
                    rows.append(_row(t, codec, ratio, knobs, res, scorer.score(td, res.pop("decoded"), heads[t]),
                                     refs[t]))
                    log(f"  {t} {codec} {knobs} -> x{rows[-1]['ratio_file']}: {rows[-1]['score']} "
                        f"({rows[-1]['delta_points']:+} pts), rel err {rows[-1]['rel_error']}")
            if budget is not None:
                rows += _budget_rows(cfg, t, td, tvs[t], heads[t], scorer, refs[t], budget, tmp, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _ratios(cfg: Config, codec: str) -> list[float | None]:
    from .rate import RATE_KNOBS

    return list(cfg.ratios) if codec in RATE_KNOBS else [None]


def _budget_rows(cfg: Config, t: str, td, tv, head, scorer: Scorer, ref: float, budget: Callable, tmp: Path,
                 log: Log) -> list[dict]:
    """``budget(tv)`` measures the task's candidates once; each ratio then only allocates."""
    rows, run = [], budget(tv)
    for ratio in cfg.ratios:
        res = run(ratio, tmp / "b")
        rows.append(_row(t, "budget", ratio, res.pop("choices"), res, scorer.score(td, res.pop("decoded"), head),
                         ref))
        log(f"  {t} budget x{ratio} -> x{rows[-1]['ratio_file']}: {rows[-1]['score']} "
            f"({rows[-1]['delta_points']:+} pts)")
    return rows


def merge_compressed(cfg: Config, tasks, tvs, heads, scorer: Scorer, log: Log) -> list[dict]:
    """Task arithmetic (lam ``cfg.merge_lam``) of the four deltas, uncompressed and compressed at
    ``cfg.merge_ratio`` by each codec, merged from the files; every task scored with its own head."""
    from deltakit.merge import build_config, merge_task_vectors
    from deltakit.taskvec import TaskVector

    rows, tmp = [], scratch()
    try:
        for codec in ["none", *codec_names(cfg)]:
            files = []
            for i, t in enumerate(tasks):
                knobs = {} if codec == "none" else plan(codec, cfg.merge_ratio, tvs[t]) if _ratios(cfg, codec)[0] else {}
                if knobs is None:
                    break
                if codec == "none":
                    TaskVector.from_mapping(tvs[t]).save(tmp / f"{codec}{i}")
                else:
                    compress_delta(tvs[t], codec, knobs, tmp / f"{codec}{i}")
                files.append(TaskVector.load(tmp / f"{codec}{i}"))
            else:
                merged = merge_task_vectors("task_arithmetic", files, build_config("task_arithmetic",
                                                                                   {"lam": cfg.merge_lam}))
                dw = {n: merged.dense(n, torch.float32) for n in merged.keys()}
                scores = {t: scorer.score(td, dw, heads[t]) for t, td in tasks.items()}
                rows.append({"codec": codec, "ratio": cfg.merge_ratio if _ratios(cfg, codec)[0] else None,
                             "scores": scores, "mean": round(sum(scores.values()) / len(scores), 5),
                             "load": load_avg()[0]})
                log(f"  merge {codec}: {scores}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
