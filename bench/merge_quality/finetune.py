"""Fine-tunes (full and LoRA) and their statistics (Fisher, Grams), cached by configuration.

A task vector here is the library's: ``TaskVector.from_state_dicts`` (full FT) or
``TaskVector.from_adapter`` (LoRA), applied with ``TaskVector.apply``; the cache is
``_common.TensorCache`` (safetensors through ``deltakit.io``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from _common import Log, TensorCache, load_avg, timer

from .config import HEAD_PREFIX, Config
from .data import TaskData, autocast, batches, load_tasks

__all__ = ["finetune", "compose", "compute_stats", "pretrain"]


def compose(base_state: Mapping[str, torch.Tensor], dw: Mapping[str, torch.Tensor] | None,
            head: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A classifier state dict: ``base + dW`` (``TaskVector.apply``) with a task's head."""
    from deltakit.taskvec import TaskVector

    out = TaskVector.from_mapping(dw).apply(base_state) if dw else dict(base_state)
    out.update(head)
    return out


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def finetune(cfg: Config, kind: str, td: TaskData, base_state: dict[str, torch.Tensor], cache: Path,
             log: Log) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Train one task; returns (encoder task vector {name: dense dW}, head {name: weight}, info)."""
    store = TensorCache(cache)
    key = cfg.train_key(kind, td.name)
    hit = store.get(key)
    if hit is not None:
        tensors, meta = hit
        return _split(tensors, "tv/"), _split(tensors, "head/"), meta | {"cached": True}
    model, adapter, n_train, losses, train_s = _train(cfg, kind, td)
    tv, head = _task_vector_and_head(kind, model, adapter, base_state)
    info = {"kind": kind, "task": td.name, "train_s": train_s, "trainable_params": n_train,
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(losses[-1], 4) if losses else None, "loss_history": [round(x, 4) for x in losses],
            "roundtrip_max_abs_logit_diff": _roundtrip(cfg, td, model, base_state, tv, head),
            "load_after": load_avg(), "cached": False}
    log(f"  trained {kind}/{td.name}: {n_train:,} params, {train_s:.0f}s, loss {info['loss_first']} -> "
        f"{info['loss_last']}, round-trip |dlogit| {info['roundtrip_max_abs_logit_diff']:.1e}")
    store.put(key, {**{f"tv/{k}": v for k, v in tv.items()}, **{f"head/{k}": v for k, v in head.items()}}, info)
    return tv, head, info


def _train(cfg: Config, kind: str, td: TaskData):
    """(model, adapter or None, trainable count, losses, seconds) of one fine-tune."""
    import deltakit
    from deltakit.io.models import head_modules, load_classifier
    from deltakit.train import fit

    model, _ = load_classifier(cfg.model, td.labels, seed=cfg.seed)
    adapter = None
    if kind == "lora":
        lcfg = deltakit.LoraConfig(r=cfg.r, alpha=cfg.alpha, targets=("query", "value"),
                                   modules_to_save=head_modules(model))
        adapter = deltakit.attach(model, lcfg, name=td.name)
    lr = cfg.lr_full if kind == "full" else cfg.lr_lora
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def loss_fn(m, batch):
        with autocast(cfg):
            return m(**batch).loss.float()

    elapsed = timer()
    res = fit(model, td.loaders["fit"], lr=lr, max_steps=cfg.steps, warmup_steps=int(cfg.warmup_frac * cfg.steps),
              schedule="linear", weight_decay=cfg.weight_decay, seed=cfg.seed, progress=False,
              log_every=max(1, cfg.steps // 10), loss_fn=loss_fn)
    train_s = elapsed()
    return model, adapter, n_train, [h["loss"] for h in res.history if "loss" in h], train_s


def _task_vector_and_head(kind: str, model, adapter, base_state):
    """Full FT: ``finetuned - base`` over the encoder; LoRA: the q/v dWs. Plus the trained head."""
    from deltakit.taskvec import TaskVector

    if kind == "full":
        ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
        enc = [k for k in base_state if not k.startswith(HEAD_PREFIX)]
        tv_obj = TaskVector.from_state_dicts({k: ft[k] for k in enc}, {k: base_state[k] for k in enc})
        return {n: tv_obj.dense(n) for n in tv_obj.keys()}, {k: ft[k] for k in ft if k.startswith(HEAD_PREFIX)}
    tv_obj = TaskVector.from_adapter(adapter, include_full=False)
    full_tv = TaskVector.from_adapter(adapter)
    head = {n: base_state[n] + full_tv.dense(n, torch.float32) for n in full_tv.keys() if n.startswith(HEAD_PREFIX)}
    return {n: tv_obj.dense(n, torch.float32) for n in tv_obj.keys()}, head


def _roundtrip(cfg: Config, td: TaskData, model, base_state, tv, head) -> float:
    """max |logit| difference: the trained model vs base + task vector + head in a fresh model
    (what merging uses)."""
    from deltakit.io.models import load_classifier

    probe = {k: v[:16] for k, v in next(iter(td.loaders["dev"])).items()}
    with torch.no_grad(), autocast(cfg):
        model.eval()
        ref = model(**probe).logits.float()
        fresh, _ = load_classifier(cfg.model, td.labels, seed=cfg.seed)
        fresh.load_state_dict(compose(base_state, tv, head))
        fresh.eval()
        got = fresh(**probe).logits.float()
    return float((ref - got).abs().max())


def compute_stats(cfg: Config, kind: str, tasks: dict[str, TaskData], tok, base_state, tvs, heads, cache: Path,
                  log: Log) -> tuple[dict[str, list], dict]:
    """{"fisher": [per task {name: F}], "gram": [per task {name: G}]} over each task's fit split."""
    store = TensorCache(cache)
    out, info = {"fisher": [], "gram": []}, {}
    for t in tasks:
        key = hashlib.sha256(f"{cfg.train_key(kind, t)}|{cfg.fisher_rows}|{cfg.gram_rows}".encode()).hexdigest()[:12]
        hit = store.get(f"stats_{kind}_{t}_{key}")
        if hit is not None:
            tensors, meta = hit
            info[t] = meta | {"cached": True}
        else:
            tensors, meta = _stats_one(cfg, tasks[t], tok, base_state, tvs[t], heads[t])
            store.put(f"stats_{kind}_{t}_{key}", tensors, meta)
            info[t] = meta | {"cached": False}
            log(f"  stats {kind}/{t}: Fisher {meta['fisher_s']:.0f}s, Grams {meta['gram_s']:.0f}s")
        out["fisher"].append(_split(tensors, "fisher/"))
        out["gram"].append(_split(tensors, "gram/"))
    return out, info


def _stats_one(cfg: Config, td: TaskData, tok, base_state, tv, head) -> tuple[dict, dict]:
    """One fine-tuned model's diagonal Fisher and input Grams on its own fit split."""
    from deltakit.io.models import load_classifier
    from deltakit.merge import collect_grams, estimate_fisher

    model, _ = load_classifier(cfg.model, td.labels, seed=cfg.seed)
    model.load_state_dict(compose(base_state, tv, head))
    model.eval()  # no dropout: the Fisher of the deterministic fine-tuned model
    names = list(tv)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)

    def loss(m, b):
        with autocast(cfg):
            return m(**b).loss.float()

    elapsed = timer()
    fisher = estimate_fisher(model, batches(td.fit, tok, cfg, 1, cfg.fisher_rows, True), loss_fn=loss, names=names)
    fisher_s = elapsed()
    elapsed = timer()
    with autocast(cfg):
        grams = collect_grams(model, batches(td.fit, tok, cfg, 16, cfg.gram_rows, False))
    grams = {n: g for n, g in grams.items() if n in tv}
    meta = {"fisher_s": fisher_s, "gram_s": elapsed(), "fisher_rows": cfg.fisher_rows, "gram_rows": cfg.gram_rows}
    return {**{f"fisher/{k}": v for k, v in fisher.items()}, **{f"gram/{k}": v for k, v in grams.items()}}, meta


def _finetune_job(cfg: Config, kind: str, task: str, cache: Path) -> tuple[str, str, float]:
    """Worker side of :func:`pretrain`: one fine-tune, written to the cache."""
    from deltakit.io.models import load_classifier

    torch.set_num_threads(cfg.threads)
    base_model, tok = load_classifier(cfg.model, 2, seed=cfg.seed)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    td = load_tasks(dataclasses.replace(cfg, tasks=(task,)), tok)[task]  # seeded per task: same rows
    _, _, info = finetune(cfg, kind, td, base_state, cache, Log())
    return kind, task, info["train_s"]


def pretrain(cfg: Config, cache: Path, log: Log) -> None:
    """Run the fine-tunes that are not cached yet in ``cfg.workers`` processes (the main
    loop then reads them from the cache); a no-op with one worker."""
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = [(k, t) for k in cfg.kinds for t in cfg.tasks if cfg.train_key(k, t) not in TensorCache(cache)]
    if cfg.workers < 2 or len(todo) < 2:
        return
    log(f"fine-tuning {len(todo)} models in {cfg.workers} processes")
    with cf.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_finetune_job, cfg, k, t, cache) for k, t in todo]
        for fut in cf.as_completed(futs):
            kind, task, train_s = fut.result()
            log(f"  fine-tuned {kind}/{task} in {train_s:.0f}s")
