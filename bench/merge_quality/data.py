"""Task data of the merge-quality benchmark: fit / selection / dev splits and their loaders."""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TASK_METRIC, Config

__all__ = ["TaskData", "load_tasks", "batches", "by_length", "autocast", "majority_baseline"]


def autocast(cfg: Config):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def _text_len(row: Mapping) -> int:
    return sum(len(row.get(c, "")) for c in ("sentence", "sentence1", "sentence2"))


def by_length(rows: list[dict]) -> list[dict]:
    """Evaluation order: by text length, so ``padding='longest'`` batches carry little padding."""
    return sorted(rows, key=_text_len)


@dataclass
class TaskData:
    name: str
    metric: str
    fit: list[dict]
    select: list[dict]
    dev: list[dict]
    labels: int = 2
    loaders: dict = field(default_factory=dict)  # "fit" (shuffled), "select", "dev" (length-sorted)


def load_tasks(cfg: Config, tok) -> dict[str, TaskData]:
    """Each task's seeded train sample split into fit and selection rows, and its dev rows."""
    from deltakit.train.data import load_glue_dir, make_loader, num_labels

    out = {}
    for t in cfg.tasks:
        d = Path(cfg.data_dir) / t
        rows = load_glue_dir(d, "train", max_rows=cfg.n_fit + cfg.n_select, seed=cfg.seed)
        dev = load_glue_dir(d, "dev", max_rows=cfg.n_dev, seed=cfg.seed)
        k = num_labels(rows, dev)
        if cfg.binary_only and k != 2:
            raise ValueError(f"{t}: expected a 2-label task, found {k} labels")
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        select = [rows[i] for i in sorted(order[:cfg.n_select])]
        fit = [rows[i] for i in sorted(order[cfg.n_select:])]
        td = TaskData(t, TASK_METRIC.get(t, "accuracy"), fit, select, dev, k)
        td.loaders["fit"] = make_loader(fit, tok, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                        shuffle=True, seed=cfg.seed)
        for split, rs in (("select", select), ("dev", dev)):
            td.loaders[split] = make_loader(by_length(rs), tok, batch_size=cfg.eval_batch,
                                            max_length=cfg.max_length)
        out[t] = td
    return out


def batches(rows: list[dict], tok, cfg: Config, batch_size: int, n: int, labels: bool) -> list[dict]:
    """The first ``n`` rows as encoded batches (length-sorted when batched; without labels on request)."""
    from deltakit.train.data import make_loader

    rows = by_length(rows[:n]) if batch_size > 1 else rows[:n]
    out = []
    for b in make_loader(rows, tok, batch_size=batch_size, max_length=cfg.max_length):
        if not labels:
            b.pop("labels")
        out.append(b)
    return out


def majority_baseline(cfg: Config) -> dict:
    """Dev scores of predicting each task's majority TRAIN label for every dev row."""
    from collections import Counter

    from deltakit.train.data import load_glue_dir
    from deltakit.train.metrics import METRICS

    out = {}
    for t in cfg.tasks:
        d = Path(cfg.data_dir) / t
        train = load_glue_dir(d, "train", max_rows=cfg.n_fit + cfg.n_select, seed=cfg.seed)
        dev = load_glue_dir(d, "dev", max_rows=cfg.n_dev, seed=cfg.seed)
        label = Counter(r["label"] for r in train).most_common(1)[0][0]
        y = torch.tensor([r["label"] for r in dev])
        p = torch.full_like(y, label)
        m = TASK_METRIC.get(t, "accuracy")
        out[t] = {"metric": m, "score": round(METRICS[m](p, y), 5), "accuracy": round(METRICS["accuracy"](p, y), 5),
                  "label": label}
    return out
