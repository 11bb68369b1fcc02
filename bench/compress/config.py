"""The compression benchmark's configuration: tasks, fine-tunes, codec rate knobs, ratios."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from merge_quality.config import Config as FinetuneConfig

__all__ = ["Config", "QUICK", "DEFAULT_CACHE", "finetune_config"]

# under the user's cache (kept across reboots, unlike /tmp): the four full fine-tunes take
# about 12 min on 2 idle cores and are reused by every rerun
DEFAULT_CACHE = os.environ.get("DELTAKIT_BENCH_CACHE", os.path.expanduser("~/.cache/deltakit/bench_compress"))


@dataclass(frozen=True)
class Config:
    # tasks where a full fine-tune of MiniLM clearly beats the majority class (checked in the report)
    tasks: tuple[str, ...] = ("sst2", "qnli", "subj", "ag_news")
    ratios: tuple[float, ...] = (4, 8, 16, 32, 64)   # x smaller than the fp32 delta
    n_fit: int = 2000
    n_dev: int = 400
    steps: int = 400
    lr_full: float = 1e-4
    merge_ratio: float = 16         # part (c): merges of deltas compressed at this ratio
    merge_lam: float = 0.3          # task arithmetic's coefficient for the 4-task merge
    llm_dir: str = "runs/llm_tasks"  # part (b): the SmolLM2 task adapters (bench/llm_tasks.py)
    llm_tasks: tuple[str, ...] = ("sst2", "ag_news")
    llm_ratios: tuple[float, ...] = (8, 16, 32)
    llm_dev: int = 100
    codecs: tuple[str, ...] | None = None   # None: every registered compressor
    seed: int = 0
    threads: int = 2
    quick: bool = False


QUICK = dict(tasks=("sst2", "ag_news"), ratios=(8, 32), n_fit=64, n_dev=32, steps=4, llm_tasks=("sst2",),
             llm_ratios=(16,), llm_dev=8, quick=True)


def finetune_config(cfg: Config) -> FinetuneConfig:
    """The merge-quality benchmark's fine-tuning settings (same cache keys, so its fine-tunes are
    shared), full fine-tuning only, any number of labels."""
    return dataclasses.replace(FinetuneConfig(), tasks=cfg.tasks, n_fit=cfg.n_fit, n_dev=cfg.n_dev,
                               steps=cfg.steps, lr_full=cfg.lr_full, kinds=("full",), binary_only=False,
                               seed=cfg.seed, threads=cfg.threads, workers=1,
                               **({"n_select": 8, "batch_size": 8, "quick": True} if cfg.quick else {}))
