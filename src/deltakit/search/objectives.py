"""What a trial measures: the task metric, trainable parameters, stored bytes, latency.

* ``metric``: the task metric (``task.metric``) on a **held-out split of the training
  rows** (one seeded shuffle; the dev set is never read, so the search cannot overfit the
  numbers it is later judged by);
* ``params``: trainable parameters of the delta, the classification head excluded (every
  method trains the same head in full);
* ``bytes``: the saved adapter's tensor files (``save_adapter``'s safetensors), as shipped;
* ``latency``: median milliseconds of one inference forward of a held-out batch (3 runs).

Training is deltakit's :func:`~deltakit.train.fit` on the rows read by
:mod:`deltakit.train.data`, with a linear schedule and ``warmup * steps`` warm-up steps. At
each fidelity rung the held-out metric is measured and the rung judge
(:mod:`deltakit.search.fidelity`) decides whether the trial goes on.
"""
from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import SearchSpec, TaskSpec

__all__ = ["Prepared", "prepare", "train_trial", "toy_values", "holdout_split", "TrialStopped"]


class TrialStopped(Exception):
    """A rung judge stopped the trial at ``step`` (the driver turns it into Optuna's pruned state)."""

    def __init__(self, step: int):
        super().__init__(f"stopped at rung step {step}")
        self.step = step


@dataclass
class Prepared:
    """One worker's data and base model, read once and reused by every trial."""

    fit_rows: list[dict]
    holdout_rows: list[dict]
    model: Any
    tokenizer: Any
    num_labels: int
    num_layers: int | None


def holdout_split(rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(fit rows, held-out rows): one seeded shuffle, the last ``fraction`` held out (at least one row)."""
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_out = max(1, round(len(rows) * fraction))
    if n_out >= len(rows):
        raise ValueError(f"task.holdout: expected training rows left after holding out {n_out}, found {len(rows)} rows")
    return [rows[i] for i in order[:-n_out]], [rows[i] for i in order[-n_out:]]


def prepare(task: TaskSpec, seed: int) -> Prepared:
    """Read the training split (never dev), hold out part of it, load the classifier."""
    from ..io.models import load_classifier
    from ..train.data import check_labels, read_rows, split_file

    rows = read_rows(split_file(task.train, "train"), max_rows=task.max_rows, seed=seed)
    fit_rows, held = holdout_split(rows, task.holdout, seed)
    k = check_labels(rows)
    model, tok = load_classifier(task.model, k, seed=seed)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return Prepared(fit_rows, held, model, tok, k, layers)


def _attach(prep: Prepared, method: str, settings: Mapping[str, Any]):
    from ..core.adapter import attach
    from ..io.models import head_modules
    from .space import config_from

    model = copy.deepcopy(prep.model)
    settings = dict(settings)
    settings.setdefault("modules_to_save", head_modules(model))
    adapter = attach(model, config_from(method, settings), name="trial")
    return model, adapter


def _head_params(model, adapter) -> int:
    names = set(adapter.config.modules_to_save or ())
    return sum(p.numel() for n, m in model.named_modules() if n in names for p in m.parameters() if p.requires_grad)


class _Rungs:
    """fit callback: at each rung step, score the held-out rows and ask the judge."""

    stateless = True

    def __init__(self, steps: list[int], score, judge, trial):
        self.steps, self.score, self.judge, self.trial = set(steps), score, judge, trial

    def on_step(self, step: int, model) -> None:
        if step in self.steps and not self.judge.keep(self.trial, step, self.score(step)):
            raise TrialStopped(step)


def train_trial(spec: SearchSpec, prep: Prepared, method: str, settings: Mapping[str, Any],
                training: Mapping[str, Any], judge=None, trial=None) -> dict[str, float]:
    """Train one point and measure ``spec.objectives``; raises :class:`TrialStopped` at a rung."""
    from ..core.adapter import param_counts
    from ..train import evaluate, fit
    from ..train.data import make_loader

    task = spec.task
    model, adapter = _attach(prep, method, settings)
    params = param_counts(model)[0] - _head_params(model, adapter)
    train_loader = make_loader(prep.fit_rows, prep.tokenizer, batch_size=task.batch_size, max_length=task.max_length,
                               shuffle=True, seed=spec.seed)
    held = make_loader(prep.holdout_rows, prep.tokenizer, batch_size=64, max_length=task.max_length)
    steps = int(training["steps"])
    hook_params, callbacks = adapter.training_hooks(loader=train_loader, total_steps=steps)
    static = {"params": float(params)}

    def score(step: int) -> list[float]:
        m = evaluate(model, held, metric=task.metric)[task.metric]
        return [m if o == "metric" else static.get(o, 0.0) for o in spec.objectives]

    cbs = list(callbacks)
    if judge is not None:
        cbs.append(_Rungs(judge.rungs(steps), score, judge, trial))
    fit(model, train_loader, lr=float(training["lr"]), max_steps=steps, schedule="linear",
        warmup_steps=int(round(float(training["warmup"]) * steps)), seed=spec.seed, progress=False,
        params=hook_params, callbacks=cbs, log_every=max(1, steps))
    out = {"metric": evaluate(model, held, metric=task.metric)[task.metric], "params": float(params)}
    if "bytes" in spec.objectives:
        out["bytes"] = float(compressed_bytes(adapter, task.codec, task.codec_knobs) if task.codec
                             else stored_bytes(adapter))
    if "latency" in spec.objectives:
        out["latency"] = latency_ms(model, held)
    return out


def stored_bytes(adapter) -> int:
    """Bytes of the adapter's tensor files as ``save_adapter`` writes them."""
    from ..io.adapter_files import save_adapter

    with tempfile.TemporaryDirectory() as d:
        save_adapter(adapter, Path(d) / "a")
        return sum(f.stat().st_size for f in (Path(d) / "a").iterdir() if f.suffix == ".safetensors")


def compressed_bytes(adapter, codec: str, knobs: Mapping[str, Any]) -> int:
    """Bytes of the adapter's weight deltas (its task vector, the head left out) compressed by
    ``codec``. A method with activation deltas has no task vector: an error, not a stand-in."""
    from ..core.fields import ConfigError
    from ..compress.api import compress
    from ..taskvec import TaskVector

    tv = TaskVector.from_adapter(adapter, include_full=False)
    if not len(tv.keys()):
        raise ConfigError(f"task.codec {codec!r}: expected weight deltas to compress, found none in "
                          f"{adapter.config.method} (activation deltas)")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "c"
        compress(tv, out, codec=codec, knobs=dict(knobs))
        files = [out] if out.is_file() else [f for f in out.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files)


def latency_ms(model, loader, repeats: int = 3) -> float:
    """Median milliseconds of one forward of the first held-out batch (after one warm-up)."""
    import torch

    batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
    model.eval()
    times = []
    with torch.inference_mode():
        model(**batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


# ----------------------------------------------------------------------------- toy
def toy_values(spec: SearchSpec, method: str, settings: Mapping[str, Any], training: Mapping[str, Any],
               judge=None, trial=None) -> dict[str, float]:
    """A cheap stand-in for training (``task: toy``), with a known optimum: the metric is
    ``1 - 0.05 * sum_k log2(x_k / d_k)^2`` over the sampled numbers x_k and their declared
    defaults d_k, times a learning curve ``1 - exp(-steps / 50)``; ``params`` is the sum of
    the sampled integers (a size). Sleeps ``task.toy_seconds`` per trial, spread over rungs."""
    from ..core.fields import fields_of
    from ..core.registry import get_method
    from .space import TrainingConfig

    best = {f.name: f.default for c in (get_method(method).config, TrainingConfig) for f in fields_of(c)}
    gap = sum(math.log2(v / best[k]) ** 2 for k, v in {**settings, "lr": training["lr"]}.items()
              if _positive(v) and _positive(best.get(k)))
    size = float(sum(v for v in settings.values() if isinstance(v, int) and not isinstance(v, bool)))
    steps = int(training["steps"])
    checkpoints = [*(judge.rungs(steps) if judge else []), steps]
    for step in checkpoints:
        time.sleep(spec.task.toy_seconds / len(checkpoints))
        metric = (1 - 0.05 * gap) * (1 - math.exp(-step / 50))
        vals = {"metric": metric, "params": size, "bytes": 4 * size, "latency": 1.0}
        if step < steps and not judge.keep(trial, step, [vals[o] for o in spec.objectives]):
            raise TrialStopped(step)
    return vals


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
