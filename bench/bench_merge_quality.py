"""Merge quality on real tasks: every deltakit merge method on 4 GLUE tasks, full FT and LoRA.

The bundled MiniLM (all-MiniLM-L6-v2, 6 layers, hidden 384) is fine-tuned on four
GLUE tasks read from ``<data>/<task>/{train,dev}.tsv`` (default ``/work/shared/data/text``,
env ``DELTAKIT_GLUE_DIR`` or ``--data-dir``), each with its OWN 2-label head:

* **full FT**: every weight trains; the task vector is ``finetuned - base`` over the
  encoder (embeddings, 6 blocks, pooler; everything except ``classifier.*``), made with
  ``TaskVector.from_state_dicts``;
* **LoRA**: r=8, alpha=16 on ``query`` / ``value`` through ``deltakit.attach``, the head
  trained in full (``modules_to_save``); the task vector is
  ``TaskVector.from_adapter(adapter, include_full=False)`` (the 12 q/v ``dW``s).

Same seed, steps, batch size and schedule for every task; bf16 autocast (fp32 master
weights) in training and evaluation. The 4 encoder task vectors are merged with every
method of ``deltakit.merge.list_merges()`` that applies to 4 task vectors; each task is
then scored with the merged encoder and its own fine-tuned head.

Selection never touches dev: a seeded part of each task's TRAINING sample is held out
(the *selection split*); every method's main knob is swept on it, the setting with the
best mean normalised selection score is chosen, and dev is scored at the chosen setting
and at the method's default. Data-dependent methods get their statistics from the
training data: Fisher (per-example empirical diagonal Fisher of each fine-tuned model
on its own fit split, ``estimate_fisher``), RegMean (input Gram matrices of every
``nn.Linear`` of each fine-tuned model on its own fit split, ``collect_grams``),
AdaMerging (layer-wise coefficients by entropy minimisation on the UNLABELLED inputs of
the selection split; each step holds a batch of every task and sums their entropies, the
paper's objective; ``adamerging`` at its defaults, and its starting coefficient swept over
the paper's 0.3 and task arithmetic's chosen lam).

Rows of the result table:

* ``base (lam=0)``: the pre-trained encoder with each task's own fine-tuned head (the
  head from that kind of fine-tune) = any merge with every coefficient at 0; the floor
  a merge must beat;
* ``individual``: each task's own fine-tuned model (the denominator of the normalised score);
* one row per merge method. ``norm`` = mean over tasks of merged / individual (metric:
  accuracy for SST-2 and QNLI, F1 for MRPC, Matthews correlation for CoLA).

Fine-tuned task vectors, heads and statistics are cached under ``--cache-dir``
(default ``/tmp/deltakit_merge_quality``), keyed by the training configuration, so a
rerun only redoes the merging. Writes ``bench/results/merge_quality.{json,md,png}``
(``--quick``: tiny sizes, written under the cache directory instead).

    python bench/bench_merge_quality.py [--quick] [--data-dir DIR] [--budget-min 38]
    deltakit bench merge-quality [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = os.environ.get("DELTAKIT_GLUE_DIR", "/work/shared/data/text")
DEFAULT_CACHE = os.environ.get("DELTAKIT_BENCH_CACHE", "/tmp/deltakit_merge_quality")
TASK_METRIC = {"sst2": "accuracy", "mrpc": "f1", "cola": "mcc", "qnli": "accuracy", "rte": "accuracy"}
KINDS = ("full", "lora")
HEAD_PREFIX = "classifier."

# Sweeps of each method's main knob(s): extra points besides the default setting (always run
# first); chosen on the selection split by mean normalised score. 3-4 points per method in all.
_DL = lambda *pairs: [{"density": d, "lam": l} for d, l in pairs]  # noqa: E731
SWEEPS: dict[str, list[dict]] = {
    "task_arithmetic": [{"lam": v} for v in (0.3, 0.5, 0.7)],           # default lam=1.0
    "ties": _DL((0.1, 1.0), (0.5, 1.0), (0.2, 1.5)),                    # default 0.2 / 1.0, disjoint mean
    "dare_ties": _DL((0.1, 0.5), (0.1, 0.3), (0.3, 0.5)),               # default 0.1 / 1.0, sums like TA
    "dare_linear": _DL((0.1, 0.5), (0.1, 0.3), (0.3, 0.5)),
    "darex_q": [{"q": v} for v in (0.3, 0.5, 1.0)],                     # default q=0.2 at density 0.1
    "breadcrumbs": _DL((0.9, 0.5), (0.9, 0.3), (0.7, 0.5)),             # default 0.9 / 1.0
    "breadcrumbs_ties": _DL((0.9, 0.5), (0.9, 0.3), (0.7, 0.5)),
    "della": _DL((0.3, 1.0), (0.7, 1.0), (0.5, 1.5)),                   # default 0.5 / 1.0, normalised
    "della_linear": _DL((0.5, 0.5), (0.5, 0.3), (0.3, 0.5)),            # default 0.5 / 1.0
    "cabs": [{"n": 1, "m": m, "weights": (l,) * 4} for m, l in ((4, 1.5), (8, 1.5), (8, 2.0))],  # default 1:4, 1.0
    "pcb": [{"ratio": r, "lam": l} for r, l in ((0.05, 1.0), (0.2, 1.0), (0.1, 1.5))],  # default 0.1 / 1.0
    "model_stock": [{"filter_wise": True}],
    "opcm": [{"alpha": v} for v in (0.3, 0.7)],
    "regmean": [{"alpha": v} for v in (0.5, 0.7)],                      # default 0.9
    "linear": [],        # no knob besides per-model weights (= task arithmetic with lam = 1/K)
    "multislerp": [],
    "fisher": [],
}
NOT_APPLICABLE = {
    "slerp": "interpolates the base with exactly ONE model (raises for K=4); pairwise only",
}
DATA_METHODS = {"fisher": "fisher", "regmean": "gram"}  # method -> statistic it reads from ctx.stats


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "qnli")
    data_dir: str = DEFAULT_DATA
    model: str = "minilm"
    n_fit: int = 2000            # training rows per task (seeded sample of train.tsv)
    n_select: int = 150          # further train rows per task held out as the selection split
    n_dev: int | None = 400      # dev rows per task (seeded sample; None = all)
    steps: int = 400             # optimiser steps per fine-tune (every task, both kinds); 100 left
                                 # CoLA at MCC 0 and QNLI near chance: nothing for a merge to keep
    batch_size: int = 16
    max_length: int = 128
    lr_full: float = 1e-4
    lr_lora: float = 2e-3
    r: int = 8
    alpha: float = 16.0
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    bf16: bool = True
    seed: int = 0
    eval_batch: int = 128
    fisher_rows: int = 48        # examples (batches of one) for each model's diagonal Fisher
    gram_rows: int = 128         # examples for each model's RegMean Gram matrices
    adamerging_steps: int = 500  # deltakit.merge.adamerging default (the paper's)
    adamerging_init: float = 0.3  # where every coefficient starts (the paper's; the library default)
    adamerging_batch: int = 4    # rows per task per step (x 4 tasks = 16 rows a step)
    sweep: bool = True
    max_sweep_points: int | None = None  # quick mode: cap the points per method
    kinds: tuple[str, ...] = KINDS
    # 1 thread: on this shared 2-core VM, 2 OpenMP threads under load made a training step ~8x
    # slower than 1 thread (spinning barriers); 1 thread is also what a busy machine can give.
    threads: int = 1
    workers: int = 2             # processes for the fine-tunes (each with ``threads`` threads)
    quick: bool = False

    def train_key(self, kind: str, task: str) -> str:
        keys = ("data_dir", "model", "n_fit", "n_select", "steps", "batch_size", "max_length", "lr_full",
                "lr_lora", "r", "alpha", "warmup_frac", "weight_decay", "bf16", "seed")
        blob = json.dumps({k: getattr(self, k) for k in keys} | {"kind": kind, "task": task}, sort_keys=True)
        return f"{kind}_{task}_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


QUICK = dict(n_fit=48, n_select=24, n_dev=32, steps=4, batch_size=8, fisher_rows=4, gram_rows=8,
             adamerging_steps=3, max_sweep_points=1, quick=True)


# ----------------------------------------------------------------------------- small helpers
def _autocast(cfg: Config):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _text_len(row: Mapping) -> int:
    return sum(len(row.get(c, "")) for c in ("sentence", "sentence1", "sentence2"))


def _by_length(rows: list[dict]) -> list[dict]:
    """Evaluation order: by text length, so ``padding='longest'`` batches carry little padding."""
    return sorted(rows, key=_text_len)


def _timer():
    t0 = time.time()
    return lambda: round(time.time() - t0, 2)


class Log:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s load {os.getloadavg()[0]:5.2f}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
@dataclass
class TaskData:
    name: str
    metric: str
    fit: list[dict]
    select: list[dict]
    dev: list[dict]
    loaders: dict = field(default_factory=dict)  # "fit" (shuffled), "select", "dev" (length-sorted)


def load_tasks(cfg: Config, tok) -> dict[str, TaskData]:
    from deltakit.train.data import load_glue_dir, make_loader, num_labels

    out = {}
    for t in cfg.tasks:
        d = Path(cfg.data_dir) / t
        rows = load_glue_dir(d, "train", max_rows=cfg.n_fit + cfg.n_select, seed=cfg.seed)
        dev = load_glue_dir(d, "dev", max_rows=cfg.n_dev, seed=cfg.seed)
        if num_labels(rows, dev) != 2:
            raise ValueError(f"{t}: expected a 2-label task, found {num_labels(rows, dev)} labels")
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        select = [rows[i] for i in sorted(order[:cfg.n_select])]
        fit = [rows[i] for i in sorted(order[cfg.n_select:])]
        td = TaskData(t, TASK_METRIC.get(t, "accuracy"), fit, select, dev)
        td.loaders["fit"] = make_loader(fit, tok, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                        shuffle=True, seed=cfg.seed)
        for split, rs in (("select", select), ("dev", dev)):
            td.loaders[split] = make_loader(_by_length(rs), tok, batch_size=cfg.eval_batch,
                                            max_length=cfg.max_length)
        out[t] = td
    return out


# ----------------------------------------------------------------------------- fine-tuning
def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(path)), meta


def finetune(cfg: Config, kind: str, td: TaskData, base_state: dict[str, torch.Tensor], cache: Path,
             log: Log) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Train one task; returns (encoder task vector {name: dense dW}, head {name: weight}, info)."""
    import deltakit
    from deltakit.io.models import head_modules, load_classifier
    from deltakit.taskvec import TaskVector
    from deltakit.train import fit

    path = cache / f"{cfg.train_key(kind, td.name)}.safetensors"
    if path.is_file():
        tensors, meta = _read(path)
        meta["cached"] = True
        return ({k[3:]: v for k, v in tensors.items() if k.startswith("tv/")},
                {k[5:]: v for k, v in tensors.items() if k.startswith("head/")}, meta)
    model, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
    adapter = None
    if kind == "lora":
        lcfg = deltakit.LoraConfig(r=cfg.r, alpha=cfg.alpha, targets=("query", "value"),
                                   modules_to_save=head_modules(model))
        adapter = deltakit.attach(model, lcfg, name=td.name)
    lr = cfg.lr_full if kind == "full" else cfg.lr_lora
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def loss_fn(m, batch):
        with _autocast(cfg):
            return m(**batch).loss.float()

    elapsed = _timer()
    res = fit(model, td.loaders["fit"], lr=lr, max_steps=cfg.steps, warmup_steps=int(cfg.warmup_frac * cfg.steps),
              schedule="linear", weight_decay=cfg.weight_decay, seed=cfg.seed, progress=False,
              log_every=max(1, cfg.steps // 10), loss_fn=loss_fn)
    train_s = elapsed()
    losses = [h["loss"] for h in res.history if "loss" in h]
    if kind == "full":
        ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
        enc = [k for k in base_state if not k.startswith(HEAD_PREFIX)]
        tv_obj = TaskVector.from_state_dicts({k: ft[k] for k in enc}, {k: base_state[k] for k in enc})
        tv = {n: tv_obj.dense(n) for n in tv_obj.keys()}
        head = {k: ft[k] for k in ft if k.startswith(HEAD_PREFIX)}
    else:
        tv_obj = TaskVector.from_adapter(adapter, include_full=False)
        tv = {n: tv_obj.dense(n, torch.float32) for n in tv_obj.keys()}
        full_tv = TaskVector.from_adapter(adapter)
        head = {n: base_state[n] + full_tv.dense(n, torch.float32) for n in full_tv.keys()
                if n.startswith(HEAD_PREFIX)}
    # round trip: the trained model vs base + task vector + head in a fresh model (what merging uses)
    probe = next(iter(td.loaders["dev"]))
    probe = {k: v[:16] for k, v in probe.items()}
    with torch.no_grad(), _autocast(cfg):
        model.eval()
        ref = model(**probe).logits.float()
        fresh, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
        fresh.load_state_dict(_compose(base_state, tv, head))
        fresh.eval()
        got = fresh(**probe).logits.float()
    info = {"kind": kind, "task": td.name, "train_s": train_s, "trainable_params": n_train,
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(losses[-1], 4) if losses else None, "loss_history": [round(x, 4) for x in losses],
            "roundtrip_max_abs_logit_diff": float((ref - got).abs().max()), "load_after": _load(), "cached": False}
    log(f"  trained {kind}/{td.name}: {n_train:,} params, {train_s:.0f}s, loss {info['loss_first']} -> "
        f"{info['loss_last']}, round-trip |dlogit| {info['roundtrip_max_abs_logit_diff']:.1e}")
    _save(path, {**{f"tv/{k}": v for k, v in tv.items()}, **{f"head/{k}": v for k, v in head.items()}}, info)
    return tv, head, info


def _compose(base_state: Mapping[str, torch.Tensor], dw: Mapping[str, torch.Tensor] | None,
             head: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(base_state)
    for n, d in (dw or {}).items():
        out[n] = base_state[n] + d.to(base_state[n].dtype)
    out.update(head)
    return out


# ----------------------------------------------------------------------------- evaluation
class Scorer:
    """One fp32 model; loads an encoder (base + dW) and each task's head, scores under autocast."""

    def __init__(self, cfg: Config, tasks: dict[str, TaskData], base_state: dict[str, torch.Tensor]):
        from deltakit.io.models import load_classifier

        self.cfg, self.tasks, self.base = cfg, tasks, base_state
        self.model, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
        self.model.eval()
        self.seconds = 0.0
        self.calls = 0

    @torch.no_grad()
    def score(self, dws: Mapping[str, Mapping[str, torch.Tensor] | None], heads: Mapping[str, Mapping],
              split: str) -> dict[str, dict[str, float]]:
        """``dws[task]``: the encoder dW to use for that task (the same merged one for all tasks)."""
        from deltakit.train import evaluate

        elapsed = _timer()
        out, loaded = {}, None
        for t, td in self.tasks.items():
            if dws[t] is not loaded:
                self.model.load_state_dict(_compose(self.base, dws[t], {}), strict=True)
                loaded = dws[t]
            for n, w in heads[t].items():
                self.model.get_parameter(n).copy_(w)
            with _autocast(self.cfg):
                r = evaluate(self.model, td.loaders[split], sorted({td.metric, "accuracy"}))
            out[t] = {"metric": td.metric, "score": round(r[td.metric], 5), "accuracy": round(r["accuracy"], 5)}
        self.seconds += elapsed()
        self.calls += 1
        return out


def normalised(scores: Mapping[str, Mapping], ref: Mapping[str, Mapping]) -> dict:
    """Mean over tasks of merged / individual (tasks whose individual score is <= 0 are left out)."""
    per = {t: (scores[t]["score"] / ref[t]["score"] if ref[t]["score"] > 1e-9 else None) for t in scores}
    vals = [v for v in per.values() if v is not None]
    return {"mean": round(sum(vals) / len(vals), 5) if vals else None,
            "per_task": {t: (round(v, 5) if v is not None else None) for t, v in per.items()}}


# ----------------------------------------------------------------------------- merging
def merge_once(method: str, values: dict, tvs: list[dict[str, torch.Tensor]], cfg: Config,
               stats: list[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Merged encoder dW {name: tensor} through ``merge_task_vectors``; Fisher / RegMean get
    their per-model statistics as ``stats_for`` (``stack_stats``).

    Fisher and RegMean are registered with ``inputs="weights"``; with a zero base (task vectors
    in, merged dW out) both give exactly ``theta_0 + merge(tau)`` because they are affine with
    weights summing to one: sum F_k (theta_0 + tau_k) / sum F_k = theta_0 + sum F_k tau_k / sum F_k.
    """
    from deltakit.merge import build_config, merge_task_vectors, stack_stats
    from deltakit.taskvec import TaskVector

    kind = DATA_METHODS.get(method)
    stats_for = stack_stats(kind, stats) if kind is not None and stats is not None else None
    merged = merge_task_vectors(method, [TaskVector.from_mapping(tv) for tv in tvs], build_config(method, values),
                                seed=cfg.seed, stats_for=stats_for)
    return {n: merged.dense(n, torch.float32) for n in merged.keys()}


# ----------------------------------------------------------------------------- statistics
def _batches(rows: list[dict], tok, cfg: Config, batch_size: int, n: int, labels: bool) -> list[dict]:
    from deltakit.train.data import make_loader

    rows = _by_length(rows[:n]) if batch_size > 1 else rows[:n]
    out = []
    for b in make_loader(rows, tok, batch_size=batch_size, max_length=cfg.max_length):
        if not labels:
            b.pop("labels")
        out.append(b)
    return out


def compute_stats(cfg: Config, kind: str, tasks: dict[str, TaskData], tok, base_state, tvs, heads, cache: Path,
                  log: Log) -> tuple[dict[str, list], dict]:
    """{"fisher": [per task {name: F}], "gram": [per task {name: G}]} over each task's fit split."""
    from deltakit.io.models import load_classifier
    from deltakit.merge import collect_grams, estimate_fisher

    out, info = {"fisher": [], "gram": []}, {}
    for t in tasks:
        key = hashlib.sha256(f"{cfg.train_key(kind, t)}|{cfg.fisher_rows}|{cfg.gram_rows}".encode()).hexdigest()[:12]
        path = cache / f"stats_{kind}_{t}_{key}.safetensors"
        if path.is_file():
            tensors, meta = _read(path)
            info[t] = meta | {"cached": True}
        else:
            model, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
            model.load_state_dict(_compose(base_state, tvs[t], heads[t]))
            model.eval()  # no dropout: the Fisher of the deterministic fine-tuned model
            names = list(tvs[t])
            for n, p in model.named_parameters():
                p.requires_grad_(n in names)
            elapsed = _timer()

            def loss(m, b):
                with _autocast(cfg):
                    return m(**b).loss.float()

            fisher = estimate_fisher(model, _batches(tasks[t].fit, tok, cfg, 1, cfg.fisher_rows, True),
                                     loss_fn=loss, names=names)
            fisher_s = elapsed()
            elapsed = _timer()
            with _autocast(cfg):
                grams = collect_grams(model, _batches(tasks[t].fit, tok, cfg, 16, cfg.gram_rows, False))
            grams = {n: g for n, g in grams.items() if n in tvs[t]}
            meta = {"fisher_s": fisher_s, "gram_s": elapsed(), "fisher_rows": cfg.fisher_rows,
                    "gram_rows": cfg.gram_rows}
            tensors = {**{f"fisher/{k}": v for k, v in fisher.items()}, **{f"gram/{k}": v for k, v in grams.items()}}
            _save(path, tensors, meta)
            info[t] = meta | {"cached": False}
            log(f"  stats {kind}/{t}: Fisher {meta['fisher_s']:.0f}s, Grams {meta['gram_s']:.0f}s")
        out["fisher"].append({k[7:]: v for k, v in tensors.items() if k.startswith("fisher/")})
        out["gram"].append({k[5:]: v for k, v in tensors.items() if k.startswith("gram/")})
    return out, info


class MultiHead(torch.nn.Module):
    """The shared encoder (parameter names as in the classifier: ``bert.*``) + one head per task."""

    def __init__(self, hf_model, heads: Mapping[str, Mapping[str, torch.Tensor]]):
        super().__init__()
        self.bert = hf_model.bert
        self.heads = torch.nn.ModuleDict()
        for t, h in heads.items():
            lin = torch.nn.Linear(*reversed(h["classifier.weight"].shape))
            lin.weight.data.copy_(h["classifier.weight"])
            lin.bias.data.copy_(h["classifier.bias"])
            lin.requires_grad_(False)
            self.heads[t] = lin

    def forward(self, batches: Mapping[str, Mapping]) -> list[torch.Tensor]:
        """{task: encoded batch} -> one logits tensor per task, each through its own head."""
        # dropout is identity in eval
        return [self.heads[t](self.bert(**enc).pooler_output).float() for t, enc in batches.items()]


def run_adamerging(cfg: Config, tasks: dict[str, TaskData], tok, base_state, tvs_list, heads,
                   init: float) -> tuple[dict, dict]:
    from deltakit.io.models import load_classifier
    from deltakit.merge import adamerging
    from deltakit.taskvec import TaskVector

    model, _ = load_classifier(cfg.model, 2, seed=cfg.seed)
    model.load_state_dict(base_state)
    wrapper = MultiHead(model, heads).eval()
    per_task = {t: _batches(tasks[t].select, tok, cfg, cfg.adamerging_batch, len(tasks[t].select), False)
                for t in tasks}
    # one step = a batch of every task (the paper sums the tasks' entropies each step); tasks
    # with fewer batches wrap around
    rng = random.Random(cfg.seed)
    for bs in per_task.values():  # _batches groups rows by length; steps should not run short-to-long
        rng.shuffle(bs)
    n = max(len(b) for b in per_task.values())
    batches = [{t: bs[i % len(bs)] for t, bs in per_task.items()} for i in range(n)]
    tv_objs = [TaskVector.from_mapping(tv) for tv in tvs_list]
    elapsed = _timer()
    with _autocast(cfg):
        res = adamerging(wrapper, tv_objs, batches, steps=cfg.adamerging_steps, init=init, forward=lambda m, b: m(b))
    merged = res.task_vector(tv_objs)
    lam = res.coefficients
    info = {"seconds": elapsed(), "granularity": "layer", "steps": cfg.adamerging_steps, "lr": 1e-3, "init": init,
            "rows_per_task_per_step": cfg.adamerging_batch,
            "entropy_first": round(res.history[0], 4), "entropy_last": round(res.history[-1], 4),
            "coef_mean": round(float(lam.mean()), 4), "coef_min": round(float(lam.min()), 4),
            "coef_max": round(float(lam.max()), 4),
            "coef_mean_per_task": [round(float(v), 4) for v in lam.reshape(lam.shape[0], -1).mean(1)]}
    return {n: merged.dense(n, torch.float32) for n in merged.keys()}, info


# ----------------------------------------------------------------------------- one kind
def run_kind(cfg: Config, kind: str, tasks, tok, base_state, tvs: dict, heads: dict, cache: Path, deadline: float,
             log: Log, only: set[str] | None = None) -> dict:
    """Reference scores, statistics, then every method: (A) default setting on selection + dev,
    (B) sweep points on selection while the time budget allows, (C) dev at the chosen setting."""
    from deltakit.merge import get_merge, list_merges

    res: dict = {"timings": {}}
    tvs_list = [tvs[t] for t in tasks]
    norms = {t: float(torch.sqrt(sum((v.double() ** 2).sum() for v in tvs[t].values()))) for t in tasks}
    names = list(tasks)
    cos = {f"{a}-{b}": round(sum(float((tvs[a][n].double() * tvs[b][n].double()).sum()) for n in tvs[a])
                             / (norms[a] * norms[b] + 1e-30), 5)
           for i, a in enumerate(names) for b in names[i + 1:]}
    res["task_vector"] = {"tensors": len(tvs_list[0]), "numel": sum(v.numel() for v in tvs_list[0].values()),
                          "norms": {t: round(v, 5) for t, v in norms.items()}, "cosine": cos}

    scorer = Scorer(cfg, tasks, base_state)
    elapsed = _timer()
    res["individual"] = {s: scorer.score(tvs, heads, s) for s in ("select", "dev")}
    res["base"] = {s: scorer.score({t: None for t in tasks}, heads, s) for s in ("select", "dev")}
    res["timings"]["reference_evals_s"] = elapsed()
    res["base"]["norm_dev"] = normalised(res["base"]["dev"], res["individual"]["dev"])
    ref_sel = res["individual"]["select"]
    log(f"{kind}: individual dev {_fmt(res['individual']['dev'])}; base(lam=0) dev {_fmt(res['base']['dev'])}")

    elapsed = _timer()
    stats, res["stats"] = compute_stats(cfg, kind, tasks, tok, base_state, tvs, heads, cache, log)
    res["timings"]["stats_s"] = elapsed()

    def evaluate_point(method, values, st):
        t_merge = _timer()
        try:
            dw = merge_once(method, values, tvs_list, cfg, st)
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
            log(f"  {kind}/{method} {values or 'default'}: ERROR {type(e).__name__}: {e}")
            return {"values": values, "error": f"{type(e).__name__}: {e}"}, None
        merge_s = t_merge()
        t_eval = _timer()
        sc = scorer.score({t: dw for t in tasks}, heads, "select")
        pt = {"values": values, "is_default": not values, "merge_s": merge_s, "eval_s": t_eval(), "select": sc,
              "norm_select": normalised(sc, ref_sel)}
        log(f"  {kind}/{method} {values or 'default'}: select norm {pt['norm_select']['mean']} "
            f"(merge {merge_s:.1f}s, eval {pt['eval_s']:.1f}s)")
        return pt, dw

    def dev(entry, label, dw):
        t_eval = _timer()
        entry[f"dev_{label}"] = scorer.score({t: dw for t in tasks}, heads, "dev")
        entry[f"norm_dev_{label}"] = normalised(entry[f"dev_{label}"], res["individual"]["dev"])
        return t_eval()

    # (A) every method at its default setting
    elapsed = _timer()
    def want(method: str) -> bool:  # task arithmetic always runs: the reference (and AdaMerging's start)
        return only is None or method in only or method == "task_arithmetic"

    order = ["task_arithmetic"] + [m for m in list_merges() if m != "task_arithmetic" and m not in NOT_APPLICABLE]
    order = [m for m in order if want(m)]
    methods, best_dw, dev_costs = {}, {}, []
    for method in order:
        m = get_merge(method)
        entry = {"paper": m.paper, "inputs": m.inputs, "default_values": _full_values(method, {}), "sweep": [],
                 "skipped_for_time": []}
        methods[method] = entry
        st = stats.get(DATA_METHODS[method]) if method in DATA_METHODS else None
        pt, dw = evaluate_point(method, {}, st)
        entry["sweep"].append(pt)
        if dw is None:
            continue
        entry["chosen"] = {}
        dev_costs.append(dev(entry, "default", dw))
        entry["dev_chosen"], entry["norm_dev_chosen"] = entry["dev_default"], entry["norm_dev_default"]
    def adamerging_point(init: float) -> tuple[dict, dict | None]:
        """AdaMerging from every coefficient at ``init``, on the unlabelled selection inputs."""
        try:
            dw, info = run_adamerging(cfg, tasks, tok, base_state, tvs_list, heads, init=init)
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
            log(f"  {kind}/adamerging init={init}: ERROR {type(e).__name__}: {e}")
            return {"values": {"init": init}, "error": f"{type(e).__name__}: {e}"}, None
        sc = scorer.score({t: dw for t in tasks}, heads, "select")
        default = init == cfg.adamerging_init
        pt = {"values": {} if default else {"init": init}, "is_default": default, "select": sc,
              "norm_select": normalised(sc, ref_sel), "merge_s": info["seconds"], "info": info}
        log(f"  {kind}/adamerging init={init}: select norm {pt['norm_select']['mean']} ({info['seconds']:.0f}s, "
            f"entropy {info['entropy_first']}->{info['entropy_last']}, coefficients {info['coef_min']}.."
            f"{info['coef_max']})")
        return pt, dw

    if want("adamerging"):  # the paper's defaults
        entry = {"paper": "https://arxiv.org/abs/2310.02575", "inputs": "deltas",
                 "default_values": {"granularity": "layer", "steps": cfg.adamerging_steps, "lr": 1e-3,
                                    "init": cfg.adamerging_init},
                 "skipped_for_time": []}
        pt, dw = adamerging_point(cfg.adamerging_init)
        entry["sweep"] = [pt]
        if dw is not None:
            entry["info"], entry["chosen"] = pt["info"], {}
            dev_costs.append(dev(entry, "default", dw))
            entry["dev_chosen"], entry["norm_dev_chosen"] = entry["dev_default"], entry["norm_dev_default"]
        methods["adamerging"] = entry
    res["timings"]["defaults_s"] = elapsed()

    # (B) sweeps on the selection split, while the budget allows (keeping room for the dev evals of (C))
    elapsed = _timer()
    dev_cost = max(dev_costs) if dev_costs else 0.0
    for method in order:
        entry = methods[method]
        if "chosen" not in entry or not cfg.sweep:
            continue
        st = stats.get(DATA_METHODS[method]) if method in DATA_METHODS else None
        seen = {json.dumps(_full_values(method, {}), sort_keys=True, default=str)}
        points = SWEEPS.get(method, [])
        if cfg.max_sweep_points is not None:
            points = points[:cfg.max_sweep_points]
        best = entry["sweep"][0]
        for values in points:
            key = json.dumps(_full_values(method, values), sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            pending = sum(1 for d in best_dw) + 1  # dev evals (C) still owed, this method included
            if time.time() + pending * dev_cost > deadline:
                entry["skipped_for_time"].append(values)
                continue
            pt, dw = evaluate_point(method, values, st)
            entry["sweep"].append(pt)
            if dw is not None and _better(pt, best):
                best, best_dw[method] = pt, dw
        entry["chosen"] = best["values"]
    # AdaMerging's knob: where the coefficients start (the paper's 0.3 was task arithmetic's
    # best lam in its setting; here task arithmetic's own choice on the selection split)
    entry = methods.get("adamerging")
    if entry is not None and "chosen" in entry and cfg.sweep:
        ta = methods["task_arithmetic"]
        init = float(ta["chosen"].get("lam", _full_values("task_arithmetic", {})["lam"]))
        if init != cfg.adamerging_init:
            pending = len(best_dw) + 1
            if time.time() + entry["sweep"][0]["merge_s"] + pending * dev_cost > deadline:
                entry["skipped_for_time"].append({"init": init})
            else:
                pt, dw = adamerging_point(init)
                entry["sweep"].append(pt)
                if dw is not None and _better(pt, entry["sweep"][0]):
                    best_dw["adamerging"] = dw
                    entry["chosen"], entry["info"] = pt["values"], pt["info"]
    res["timings"]["sweeps_s"] = elapsed()

    # (C) dev at the chosen setting where it is not the default
    elapsed = _timer()
    for method, dw in best_dw.items():
        entry = methods[method]
        dev(entry, "chosen", dw)
        log(f"{kind}/{method}: chosen {_setting(entry['chosen'])}: dev norm {entry['norm_dev_chosen']['mean']} "
            f"(default {entry['norm_dev_default']['mean']})")
    best_dw.clear()
    res["timings"]["chosen_dev_s"] = elapsed()
    res["methods"] = methods
    res["timings"]["eval_s_total"] = round(scorer.seconds, 1)
    res["timings"]["eval_calls"] = scorer.calls
    res["timings"]["dev_eval_s_max"] = round(dev_cost, 2)
    return res


def _better(p: dict, q: dict) -> bool:
    a, b = p["norm_select"]["mean"], q["norm_select"]["mean"]
    return a is not None and (b is None or a > b + 1e-12)


def _full_values(method: str, values: dict) -> dict:
    from deltakit.merge import build_config

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
            dataclasses.asdict(build_config(method, values)).items()}


def _fmt(scores: Mapping) -> str:
    return ", ".join(f"{t} {v['score']:.3f}" for t, v in scores.items())


# ----------------------------------------------------------------------------- report
def _setting(values: dict) -> str:
    if not values:
        return "default"
    parts = []
    for k, v in values.items():
        if k == "weights":
            k, v = "w", v[0]
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _norm_acc(dev: Mapping, ref: Mapping) -> float:
    """Mean over ALL tasks of merged / individual accuracy (a check on the metric-normalised score)."""
    return sum(dev[t]["accuracy"] / ref[t]["accuracy"] for t in dev) / len(dev)


def table(result: dict) -> str:
    tasks = result["config"]["tasks"]
    head = {"accuracy": "acc", "f1": "F1", "mcc": "MCC"}
    cols = [f"{t} {head[TASK_METRIC.get(t, 'accuracy')]}" for t in tasks]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = []
    for kind in KINDS:
        r = result["kinds"].get(kind)
        if r is None:
            continue
        ref = r["individual"]["dev"]
        title = "full fine-tuning" if kind == "full" else f"LoRA r={result['config']['r']} (query, value)"
        lines += [f"### {title}", "",
                  "| method | setting (chosen on selection split) | " + " | ".join(cols)
                  + " | norm (chosen) | norm (default) | norm acc (chosen) |",
                  "|---|---|" + "---:|" * (len(cols) + 3)]

        def row(name, setting, dev, n_chosen, n_default, n_acc):
            cells = [f"{dev[t]['score']:.3f}" for t in tasks]
            lines.append(f"| {name} | {setting} | " + " | ".join(cells)
                         + f" | {f(n_chosen)} | {f(n_default)} | {f(n_acc)} |")

        if result.get("majority_baseline"):
            maj = result["majority_baseline"]
            row("majority class (reference)", "-", maj, normalised(maj, ref)["mean"], None, _norm_acc(maj, ref))
        row("individual fine-tuned", "-", ref, 1.0, 1.0, 1.0)
        row("base encoder + own head (lam=0)", "-", r["base"]["dev"], r["base"]["norm_dev"]["mean"],
            r["base"]["norm_dev"]["mean"], _norm_acc(r["base"]["dev"], ref))
        ranked = sorted(((m, e) for m, e in r["methods"].items() if "norm_dev_chosen" in e),
                        key=lambda me: -me[1]["norm_dev_chosen"]["mean"])
        for m, e in ranked:
            row(m, _setting(e["chosen"]), e["dev_chosen"], e["norm_dev_chosen"]["mean"],
                e.get("norm_dev_default", {}).get("mean"), _norm_acc(e["dev_chosen"], ref))
        left_out = [t for t in tasks if ref[t]["score"] <= 1e-9]
        if left_out:
            lines += ["", f"norm leaves out {', '.join(left_out)}: the individual fine-tune scores "
                          f"{', '.join(f(ref[t]['score']) for t in left_out)} there (no ratio)."]
        failed = [m for m, e in r["methods"].items() if "norm_dev_chosen" not in e]
        if failed:
            lines.append("")
            lines.append("failed: " + "; ".join(f"{m} ({e.get('error') or e['sweep'][0].get('error')})"
                                                for m, e in r["methods"].items() if m in failed))
        lines.append("")
    return "\n".join(lines)


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


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if k in result["kinds"]]
    methods = sorted({m for k in kinds for m, e in result["kinds"][k]["methods"].items() if "norm_dev_chosen" in e},
                     key=lambda m: -max(result["kinds"][k]["methods"].get(m, {}).get("norm_dev_chosen", {})
                                        .get("mean", -9) for k in kinds))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(methods) + 2.6))
    h = 0.38
    colors = {"full": "#3b6ea8", "lora": "#e07b39"}
    labels = {"full": "full fine-tuning", "lora": "LoRA r=8"}
    for j, k in enumerate(kinds):
        ms = result["kinds"][k]["methods"]
        y = [i + (j - 0.5) * h for i in range(len(methods))]
        chosen = [ms.get(m, {}).get("norm_dev_chosen", {}).get("mean", float("nan")) for m in methods]
        default = [ms.get(m, {}).get("norm_dev_default", {}).get("mean", float("nan")) for m in methods]
        ax.barh(y, chosen, height=h, color=colors[k], label=f"{labels[k]}: tuned on selection split")
        for yy, v in zip(y, chosen):
            if v == v:
                ax.text(max(v, 0) + 0.005, yy, f"{v:.2f}", va="center", fontsize=7)
        ax.scatter(default, y, marker="|", s=120, color="black", zorder=3,
                   label="default setting" if j == 0 else None)
        base = result["kinds"][k]["base"]["norm_dev"]["mean"]
        ax.axvline(base, color=colors[k], ls=":", lw=1.2, label=f"{labels[k]}: base encoder + own heads")
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("normalised dev score (merged / individual fine-tuned, mean over "
                  + ", ".join(result["config"]["tasks"]) + ")")
    lo = min(0.0, min(float(v) for k in kinds for v in _all_norms(result["kinds"][k])) - 0.05)
    ax.set_xlim(lo, 1.12)
    ax.set_title("deltakit merge quality: MiniLM, 4 GLUE tasks merged into one encoder")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07 - 0.6 / len(methods)), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _all_norms(r: dict):
    yield r["base"]["norm_dev"]["mean"]
    for e in r["methods"].values():
        for key in ("norm_dev_chosen", "norm_dev_default"):
            v = e.get(key, {}).get("mean")
            if v is not None:
                yield v


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

    todo = [(k, t) for k in cfg.kinds for t in cfg.tasks
            if not (cache / f"{cfg.train_key(k, t)}.safetensors").is_file()]
    if cfg.workers < 2 or len(todo) < 2:
        return
    log(f"fine-tuning {len(todo)} models in {cfg.workers} processes")
    with cf.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_finetune_job, cfg, k, t, cache) for k, t in todo]
        for fut in cf.as_completed(futs):
            kind, task, train_s = fut.result()
            log(f"  fine-tuned {kind}/{task} in {train_s:.0f}s")


# ----------------------------------------------------------------------------- main
def run(quick: bool = False, **overrides) -> dict:
    out_dir = Path(overrides.pop("out_dir", None) or (Path(DEFAULT_CACHE) / "quick" if quick else HERE / "results"))
    cache = Path(overrides.pop("cache_dir", None) or DEFAULT_CACHE)
    budget_min = overrides.pop("budget_min", None) or 38.0
    only = set(overrides.pop("methods", None) or ()) or None
    cfg = Config(**({**QUICK, **overrides} if quick else overrides))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = Log()
    t_start = time.time()
    load_start = _load()
    log(f"merge-quality bench ({'quick' if quick else 'full'}): tasks {cfg.tasks}, {cfg.steps} steps x "
        f"{cfg.batch_size}, fit {cfg.n_fit} / select {cfg.n_select} / dev <= {cfg.n_dev} rows per task; "
        f"budget {budget_min} min; cache {cache}")
    from deltakit.io.models import load_classifier

    base_model, tok = load_classifier(cfg.model, 2, seed=cfg.seed)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    del base_model
    tasks = load_tasks(cfg, tok)
    result = {"benchmark": "merge_quality", "quick": quick, "config": dataclasses.asdict(cfg),
              "definitions": {
                  "selection_split": "n_select rows of each task's train sample, held out from fine-tuning; "
                                     "all sweeps / choices use it; dev is only scored",
                  "base": "pre-trained encoder + each task's own fine-tuned head (= merge with lam=0)",
                  "individual": "each task's own fine-tuned encoder + head",
                  "normalised": "mean over tasks of merged / individual dev score",
                  "metrics": {t: TASK_METRIC.get(t, "accuracy") for t in cfg.tasks}},
              "sweeps": {m: SWEEPS.get(m, []) for m in SWEEPS}, "not_run": dict(NOT_APPLICABLE),
              "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "load_start": load_start},
              "data": {t: {"fit": len(td.fit), "select": len(td.select), "dev": len(td.dev)}
                       for t, td in tasks.items()},
              "kinds": {}, "timings": {}}
    log(f"data: {result['data']}")
    pretrain(cfg, cache, log)
    trained = {}
    for kind in cfg.kinds:  # all fine-tunes first, so the merge phases share what is left of the budget
        elapsed = _timer()
        tvs, heads, info = {}, {}, {}
        for t, td in tasks.items():
            tvs[t], heads[t], info[t] = finetune(cfg, kind, td, base_state, cache, log)
        trained[kind] = (tvs, heads, info)
        result["timings"][f"finetune_{kind}_s"] = elapsed()
        result["machine"][f"load_after_finetune_{kind}"] = _load()
    for i, kind in enumerate(cfg.kinds):
        remaining = budget_min * 60 - (time.time() - t_start)
        deadline = time.time() + remaining / (len(cfg.kinds) - i)
        t_kind = _timer()
        tvs, heads, info = trained.pop(kind)
        result["kinds"][kind] = {"train": info, **run_kind(cfg, kind, tasks, tok, base_state, tvs, heads, cache,
                                                            deadline, log, only=only)}
        del tvs, heads
        result["timings"][f"merge_{kind}_s"] = t_kind()
        result["machine"][f"load_after_{kind}"] = _load()
    result["timings"]["total_s"] = round(time.time() - t_start, 1)
    result["machine"]["load_end"] = _load()
    result["majority_baseline"] = majority_baseline(cfg)
    if only is not None:
        result = refresh_previous(result, out_dir / "merge_quality.json", only, log)
    write_report(result, out_dir)
    log(f"wrote {out_dir / 'merge_quality.json'}, .md, .png; total {result['timings']['total_s']:.0f}s")
    return result


# what must be equal for a partial rerun's methods to sit in the same table as the rest
_SAME = ("tasks", "data_dir", "model", "n_fit", "n_select", "n_dev", "steps", "batch_size", "max_length", "lr_full",
         "lr_lora", "r", "alpha", "warmup_frac", "weight_decay", "bf16", "seed", "fisher_rows", "gram_rows")


def refresh_previous(new: dict, path: Path, only: set[str], log: Log) -> dict:
    """Put the rerun methods (``--methods``) into the previous full result at ``path``.

    The previous run must have the same fine-tunes and splits; its reference rows must come
    out equal in this run (they are deterministic given the cached fine-tunes), so the
    refreshed methods are comparable with the ones left as they were.
    """
    if not path.is_file():
        raise SystemExit(f"--methods: expected a previous {path} to refresh, found none (run without --methods)")
    prev = json.loads(path.read_text())
    diff = [k for k in _SAME if json.dumps(prev["config"].get(k)) != json.dumps(new["config"].get(k))]
    if diff:
        raise SystemExit(f"--methods: expected the previous run's {diff[0]} ({prev['config'].get(diff[0])}), "
                         f"found {new['config'].get(diff[0])}; rerun everything instead")
    for kind, r in new["kinds"].items():
        old = prev["kinds"].get(kind)
        if old is None:
            raise SystemExit(f"--methods: expected kind {kind} in {path}, found {sorted(prev['kinds'])}")
        if json.dumps(old["individual"], sort_keys=True) != json.dumps(r["individual"], sort_keys=True):
            raise SystemExit(f"--methods: the {kind} fine-tunes score differently from {path}; rerun everything")
        for m in sorted(only | {"task_arithmetic"}):
            if m in r["methods"]:
                old["methods"][m] = r["methods"][m]
    prev["config"] = new["config"]  # identical where it matters (above); the refreshed methods' knobs
    prev.setdefault("refreshed", []).append({"methods": sorted(only), "at": time.strftime("%Y-%m-%d %H:%M"),
                                             "seconds": new["timings"]["total_s"], "machine": new["machine"]})
    log(f"refreshed {sorted(only)} in {path}")
    return prev


def write_report(result: dict, out_dir: Path, write_json_file: bool = True) -> None:
    """merge_quality.json (optional), .md (header + tables + summary) and .png; tables to stdout."""
    from deltakit.io.files import write_json

    cfg = result["config"]
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_json_file:
        write_json(out_dir / "merge_quality.json", result)
    md, summary = table(result), _summary(result)
    m = result["machine"]
    header = (f"# Merge quality: MiniLM on {', '.join(cfg['tasks'])} (dev scores)\n\n"
              f"Generated by `bench/bench_merge_quality.py{' --quick' if result['quick'] else ''}` in "
              f"{result['timings']['total_s'] / 60:.1f} min on {m['cpu']} ({m['cpus']} CPUs, {m['threads']} torch "
              f"thread(s), load {m['load_start'][0]} at start, {m['load_end'][0]} at the end). "
              f"{cfg['steps']} steps x batch {cfg['batch_size']} per task (full FT lr {cfg['lr_full']}, LoRA lr "
              f"{cfg['lr_lora']}), {cfg['n_fit']} training rows per task, {cfg['n_select']} more held out for "
              f"selection; dev <= {cfg['n_dev']} rows per task.\n\n"
              "Metrics: " + ", ".join(f"{t} {TASK_METRIC.get(t, 'accuracy')}" for t in cfg["tasks"])
              + ". **norm** = mean over tasks of merged / individual fine-tuned score (tasks where the individual "
              "score is <= 0 are left out); **norm acc** = the same ratio on accuracy over all tasks. Settings "
              "chosen on the held-out part of TRAIN (never on dev); 'norm (default)' is the method at its "
              "default setting. Every task keeps its own fine-tuned head; base = pre-trained encoder + those "
              "heads.\n\n")
    for r in result.get("refreshed", []):
        header += (f"Rerun later with `--methods {','.join(r['methods'])}` on the same cached fine-tunes "
                   f"({r['at']}, {r['seconds'] / 60:.1f} min): those rows (and task arithmetic, rerun with them).\n\n")
    (out_dir / "merge_quality.md").write_text(header + md + "\n" + summary + "\n")
    plot(result, out_dir / "merge_quality.png")
    print("\n" + md)
    print(summary)


def _summary(result: dict) -> str:
    lines = []
    for kind in KINDS:
        r = result["kinds"].get(kind)
        if not r:
            continue
        ms = {m: e for m, e in r["methods"].items() if "norm_dev_chosen" in e}
        ta = ms.get("task_arithmetic", {}).get("norm_dev_chosen", {}).get("mean")
        if ta is None:
            continue
        worse = sorted((m for m, e in ms.items() if m != "task_arithmetic" and e["norm_dev_chosen"]["mean"] < ta),
                       key=lambda m: ms[m]["norm_dev_chosen"]["mean"])
        tr = r["train"]
        lines.append(f"- {kind}: tuned task arithmetic {ta:.3f} ({_setting(ms['task_arithmetic']['chosen'])}); "
                     f"below it (tuned): {', '.join(worse) or 'none'}. Fine-tune {sum(v['train_s'] for v in tr.values()):.0f}s "
                     f"(losses first->last: " + ", ".join(f"{t} {v['loss_first']}->{v['loss_last']}"
                                                         for t, v in tr.items()) + ").")
        skipped = {m: e["skipped_for_time"] for m, e in r["methods"].items() if e.get("skipped_for_time")}
        if skipped:
            lines.append(f"  - sweep points skipped for the time budget: {skipped}")
    lines.append("- not run: " + "; ".join(f"{m}: {why}" for m, why in result["not_run"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes / few steps (smoke run; output under the cache)")
    p.add_argument("--data-dir", default=None, help=f"GLUE-style task folders (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", default=None, help=f"fine-tune / statistics cache (default {DEFAULT_CACHE})")
    p.add_argument("--out-dir", default=None, help="where merge_quality.{json,md,png} go (default bench/results)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default sst2,mrpc,cola,qnli)")
    p.add_argument("--kinds", default=None, help="comma-separated subset of full,lora (default both)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-fit", type=int, default=None)
    p.add_argument("--n-select", type=int, default=None)
    p.add_argument("--n-dev", type=int, default=None)
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="only rebuild the .md / .png next to this merge_quality.json (no training or merging)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="default settings only")
    p.add_argument("--methods", default=None,
                   help="comma-separated: rerun only these merge methods (task arithmetic always runs) and put them "
                        "into the existing merge_quality.json, whose fine-tunes must be the cached ones")
    p.add_argument("--budget-min", type=float, default=None,
                   help="sweep points beyond this wall-clock budget are skipped and listed (default 38)")
    a = p.parse_args(argv)
    if a.report_from:
        path = Path(a.report_from)
        result = json.loads(path.read_text())
        if "majority_baseline" not in result:
            result["majority_baseline"] = majority_baseline(Config(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()}))
        write_report(result, path.parent)
        return 0
    over = {k: v for k, v in {"data_dir": a.data_dir, "steps": a.steps, "n_fit": a.n_fit, "n_select": a.n_select,
                              "n_dev": a.n_dev, "threads": a.threads, "cache_dir": a.cache_dir, "out_dir": a.out_dir,
                              "budget_min": a.budget_min}.items() if v is not None}
    if a.tasks:
        over["tasks"] = tuple(a.tasks.split(","))
    if a.kinds:
        over["kinds"] = tuple(a.kinds.split(","))
    if a.no_bf16:
        over["bf16"] = False
    if a.no_sweep:
        over["sweep"] = False
    if a.methods:
        from deltakit.merge import list_merges

        over["methods"] = a.methods.split(",")
        unknown = [m for m in over["methods"] if m not in {*list_merges(), "adamerging"}]
        if unknown:
            p.error(f"--methods: expected merge method names, found {unknown[0]!r}")
    run(quick=a.quick, **over)
    return 0


if __name__ == "__main__":
    sys.exit(main())
