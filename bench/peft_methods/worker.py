"""One training run of the methods benchmark (runs in a worker process)."""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import reset_peak_rss, status_kb

from .config import FULL, TASK_METRIC, Config
from .counting import base_model, head_params, settings

__all__ = ["worker_init", "run_one"]


def _rows(cfg: Config, task: str) -> dict[str, list[dict]]:
    """select / probe / fit / dev rows of one task.

    One seeded shuffle of the training file: ``select`` = rows [select_n_train,
    select_n_train + n_select), ``probe`` (LR selection's fit rows) = the first
    select_n_train, ``fit`` (dev runs) = every other row in order, first steps x batch of
    them. The selection rows are never trained on in any run.
    """
    import random

    from deltakit.train.data import load_glue_dir

    train = load_glue_dir(Path(cfg.data_dir) / task, "train")
    dev = load_glue_dir(Path(cfg.data_dir) / task, "dev")
    rng = random.Random(cfg.seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    a, b = cfg.select_n_train, cfg.select_n_train + cfg.n_select
    n_fit = cfg.protocol(task)[2] if task in {t for t, *_ in cfg.task_protocol} else cfg.select_n_train
    rest = order[:a] + order[b:]
    if cfg.n_dev is not None:
        dev = dev[:cfg.n_dev]
    return {"probe": [train[i] for i in order[:a]], "select": [train[i] for i in order[a:b]],
            "fit": [train[i] for i in rest[:n_fit]], "dev": dev}


def worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers.utils import logging
    logging.set_verbosity_error()


_DATA: dict = {}


def run_one(cfg: Config, job: dict) -> dict:
    """Train ``job['method']`` with ``job['settings']`` at ``job['lr']`` on one task; score ``job['split']``."""
    import copy

    import deltakit as dk
    from deltakit.train import evaluate, fit
    from deltakit.train.data import make_loader, num_labels

    task = job["task"]
    if task not in _DATA:
        _DATA[task] = _rows(cfg, task)
    rows = _DATA[task]
    k = max(2, num_labels(rows["fit"], rows["dev"]))
    base, tok = base_model(k)
    model = copy.deepcopy(base)
    reset_peak_rss()  # the RSS high-water mark from now on
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    ad = _attach(job, model)
    trainable, total = dk.param_counts(model)
    if job["split"] == "select":  # the LR probe
        fit_rows, steps, max_length = rows["probe"], cfg.select_steps, cfg.select_max_length
    else:
        (steps, max_length, _), fit_rows = cfg.protocol(task), rows["fit"]
    train_loader = make_loader(fit_rows, tok, batch_size=cfg.batch_size, max_length=max_length,
                               shuffle=True, seed=cfg.seed)
    eval_loader = make_loader(rows[job["split"]], tok, batch_size=64, max_length=max_length)
    metric = TASK_METRIC[task]
    params, callbacks = ad.training_hooks(loader=train_loader, total_steps=steps) if ad else (None, [])
    torch.manual_seed(cfg.seed)
    # autocast per step (fit's argument), not one block around fit: a block caches each
    # weight's bf16 cast, so plain nn.Linear weights would never change in the forward
    res = fit(model, train_loader, lr=job["lr"], max_steps=steps, warmup_steps=max(1, steps // 10),
              schedule="linear", seed=cfg.seed, progress=False, params=params, callbacks=callbacks,
              log_every=max(1, steps // 5), autocast=torch.bfloat16 if cfg.bf16 else None)
    train_s = time.perf_counter() - t0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        scores = evaluate(model, eval_loader, metric=sorted({metric, "accuracy"}))
    peak_mb = status_kb("VmHWM") / 1024
    losses = [h["loss"] for h in res.history if "loss" in h]
    stored = _stored_bytes(ad, model)
    head = head_params(base)
    finite = all(math.isfinite(x) for x in losses)
    return {**job, "metric_name": metric, "metric": scores[metric] if finite else float("nan"),
            "accuracy": scores["accuracy"], "final_loss": losses[-1] if losses else None,
            "diverged": not finite, "trainable": trainable - head, "head": head,
            "base_total": sum(p.numel() for p in base.parameters()), "stored_bytes": stored,
            "steps": steps, "max_length": max_length, "n_fit": len(fit_rows),
            "train_s": train_s, "peak_rss_mb": peak_mb, "loadavg_1m": [round(load0, 2),
                                                                       round(os.getloadavg()[0], 2)]}


def _attach(job: dict, model):
    """The job's adapter on ``model`` (None for full fine-tuning: every parameter trains)."""
    import deltakit as dk

    if job["method"] == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    spec = dk.get_method(job["method"])
    return dk.attach(model, spec.config(**settings(job["method"], job["settings"], model)))


def _stored_bytes(ad, model) -> int:
    """Bytes on disk: the saved adapter's tensors, or a full checkpoint (every parameter in its dtype)."""
    import deltakit as dk

    if ad is None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        dk.save_adapter(ad, Path(d) / "a")
        return sum(f.stat().st_size for f in (Path(d) / "a").iterdir() if f.suffix == ".safetensors")
