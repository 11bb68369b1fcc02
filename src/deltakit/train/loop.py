"""The training loop: short and flat, so it can be read top to bottom and copied.

:func:`fit` trains exactly the parameters with ``requires_grad=True`` (after
``deltakit.attach`` that is the adapter) with AdamW, a warmup + constant / linear /
cosine schedule, gradient accumulation and clipping, periodic evaluation, early
stopping, atomic checkpoints that resume bit-for-bit, and data parallelism under
``torchrun``. The building blocks it calls (:func:`trainable_parameters`,
:func:`make_optimizer`, :func:`make_scheduler`, :func:`compute_loss`, :func:`evaluate`,
and the modules ``checkpoint`` / ``distributed`` / ``early_stop``) are public so an
edited copy stays short.

How :func:`fit` behaves, and why:

- *Data order.* ``train_loader`` is rebuilt with a seeded, rank-sharded sampler
  (shuffled iff it was shuffled), so the order is a function of ``seed`` and the step:
  that is what makes resume exact and ``torchrun`` runs equal to one process with the
  global batch.
- *Parameter set.* ``params`` (default: every ``requires_grad`` parameter) fixes the
  optimised set up front, for schedules that freeze and unfreeze parts while training
  (LISA: pass ``dict(adapter.named_parameters())``). ``callbacks`` drive AdaLoRA /
  IncreLoRA budgets and LISA's layer sampling.
- *Callback state.* Those schedules keep state outside the trainable parameters (EMAs,
  a sampler's RNG, rank-mask buffers, ``requires_grad`` flags), so a checkpoint that
  lacked it would resume to a different adapter. Each checkpoint therefore holds the
  ``state_dict()`` of every :class:`StatefulCallback` (tensors in ``callback-<i>.safetensors``,
  the rest in ``trainer_state.json``), and a resume restores it, or refuses: a callback
  that neither offers the protocol nor declares ``stateless = True``, or a different list
  of stateful callbacks than was saved, is an error naming it, not a warning.
- *Divergence fails loudly.* The loss is checked every step (it is read anyway), the
  gradient norm every step when clipping (clipping computes it), and the trainable
  parameters at every log step, evaluation, checkpoint and at the end (a max-abs norm
  per tensor and one sync; measured on a loaded 2-core CPU: 0.28 ms for a MiniLM LoRA,
  26 tensors, against 4.8 s for one training step of batch 16; for all 22.7 M MiniLM
  weights about a fifth of one step, paid once per ``log_every`` steps). Anything
  non-finite raises :class:`TrainingDivergedError` with the step
  *before* a checkpoint could hold it, so the last good checkpoint stays the newest.
  A NaN parameter also makes the next loss NaN, so no step goes unchecked for long.
- *Early stopping.* After ``early_stopping_patience`` evaluations in a row without a
  strict improvement of ``early_stopping_metric`` (lower is better for names ending
  in ``loss``), training stops and the best evaluated parameters (kept as one CPU copy
  of the trainable parameters) are copied back: the model ``fit`` leaves is the best
  one and ``TrainResult.metrics`` are its evaluation. The best copy is checkpointed
  too, so a resumed run stops where the uninterrupted one would.
- *Mixed precision.* ``autocast=torch.bfloat16`` (or float16) runs each forward and
  loss under ``torch.autocast`` with fp32 master weights; backward and the optimiser
  step run outside it. Calling ``fit`` inside your own ``torch.autocast`` block also
  works: autocast caches the low-precision copy of every weight for the life of the
  block, so ``fit`` clears that cache after each optimiser step; without that, the
  forward would keep using the weights as they were before training.
- *Causal LMs.* With the default loss a batch from
  :func:`deltakit.train.instruct.make_instruction_loader` trains on the model's own loss:
  ``labels`` are ``-100`` outside assistant tokens, so the prompt costs nothing.
  ``gradient_checkpointing=True`` trades a second forward per block for activation memory.
- *torch.compile.* ``compile=True`` trains through :func:`compile_model` (inductor). The
  first steps compile (minutes on a 2-core CPU), so it can pay on long runs only;
  ``bench/bench_llm.py`` measures it. Evaluation and checkpoints use the model itself (the
  same parameters).
- *Progress.* On a terminal, a tqdm bar with loss, learning rate, tokens/s
  (non-padding tokens, from ``attention_mask`` when the batch has one) and ETA;
  otherwise one line per log step with the same figures.
- *torchrun.* Gradients of the trainable parameters are averaged over processes (see
  :mod:`deltakit.train.distributed` for why not DDP), only rank 0 prints and writes
  checkpoints, and every rank evaluates the whole eval set (the models are identical,
  so are the numbers). Losses are averaged over ranks every step, so every rank sees
  a divergence at the same step.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from deltakit.train import fit
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> data = [{"x": a, "labels": b} for a, b in zip(x, y)]
    >>> model = torch.nn.Linear(4, 2)
    >>> loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["labels"])
    >>> result = fit(model, DataLoader(data, batch_size=8, shuffle=True), lr=0.1,
    ...              max_steps=20, loss_fn=loss_fn, progress=False)
    >>> result.steps
    20
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deltakit.io.files import read_json
from deltakit.train import checkpoint as ckpt
from deltakit.train import distributed as ddp
from deltakit.train.early_stop import EarlyStopping
from deltakit.train.metrics import METRICS

__all__ = ["fit", "TrainResult", "TrainingDivergedError", "StatefulCallback", "evaluate", "trainable_parameters",
           "make_optimizer", "make_scheduler", "compute_loss", "compile_model", "to_device", "Schedule"]

Schedule = Literal["constant", "linear", "cosine"]
Batch = Mapping[str, Any]


@runtime_checkable
class StatefulCallback(Protocol):
    """A :func:`fit` callback whose state goes into every checkpoint and comes back on resume.

    ``state_dict()`` returns a flat ``{name: tensor or JSON value}`` (tensors go to a
    safetensors file of the checkpoint, the rest to its JSON; nothing is pickled) and
    ``load_state_dict(state)`` takes it back, including whatever the callback changed in the
    model outside its trainable parameters (a rank mask buffer, ``requires_grad`` flags).
    A callback that keeps no state declares ``stateless = True`` instead.
    """

    def on_step(self, step: int, model: torch.nn.Module) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    ``history``: one dict per log / eval event, e.g. ``{"step": 10, "loss": 0.61, "lr": 1e-4}``
    or ``{"step": 50, "eval_accuracy": 0.82}``. ``metrics``: the last evaluation (keys
    ``eval_*``; with early stopping, the best one's) plus ``train_loss`` (mean over the
    last log window). ``steps``: optimiser steps taken in total (including those before a
    resume; fewer than asked when training stopped early). ``best_step``: with early
    stopping, the step whose parameters the model holds, else None.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    best_step: int | None = None


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` for every parameter with ``requires_grad=True``, in module order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(params: Mapping[str, torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (ndim >= 2), never on biases / norms (as nanoGPT)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps`` then constant, linear-to-0 or cosine-to-0 at ``total_steps``."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"expected schedule in ('constant', 'linear', 'cosine'), found {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    """Move every tensor of a dict batch to ``device`` (other values pass through)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"expected a batch that is a dict of tensors, found {type(batch).__name__}")
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compute_loss(model: torch.nn.Module, batch: Batch,
                 loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None) -> torch.Tensor:
    """``loss_fn(model, batch)`` if given, else ``model(**batch).loss`` (Hugging Face models with labels)."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    if "labels" not in batch:
        raise ValueError(f"expected a 'labels' key in the batch (or pass loss_fn=), found keys {sorted(batch)}")
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"expected the model output to carry .loss, found {type(out).__name__} "
                         "without it (pass loss_fn=)")
    return loss


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, metric: str | Sequence[str] = "accuracy"
             ) -> dict[str, float]:
    """Classification metrics of ``argmax(logits)`` against ``batch["labels"]`` over ``loader``.

    ``metric``: one or more of ``accuracy``, ``f1`` (binary, positive class 1),
    ``f1_macro``, ``mcc`` (Matthews). Also returns ``loss`` (mean per example) when the
    model reports one. The model may return a tensor of logits or an object with
    ``.logits``. Leaves the model's train/eval mode and the global RNG as it found them.

    Example:
        >>> import torch
        >>> from deltakit.train import evaluate
        >>> model = torch.nn.Linear(2, 2)
        >>> batch = [{"input": torch.eye(2), "labels": torch.tensor([0, 1])}]
        >>> sorted(evaluate(lambda input, labels: model(input), batch, ["accuracy", "mcc"]))
        ['accuracy', 'mcc']
    """
    names = [metric] if isinstance(metric, str) else list(metric)
    for n in names:
        if n not in METRICS:
            raise ValueError(f"expected metric in {sorted(METRICS)}, found {n!r}")
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else False
    device = _model_device(model) if is_module else torch.device("cpu")
    if is_module:
        model.eval()
    preds, labels, loss_sum, n_loss = [], [], 0.0, 0
    with torch.random.fork_rng(devices=[]):  # iterating a DataLoader draws from the global RNG
        for batch in loader:
            batch = to_device(batch, device)
            if "labels" not in batch:
                raise ValueError(f"expected a 'labels' key in every eval batch, found keys {sorted(batch)}")
            out = model(**batch)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, K)
            loss = None if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
            if loss is not None:
                loss_sum += loss.item() * len(batch["labels"])
                n_loss += len(batch["labels"])
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
    if is_module:
        model.train(was_training)
    p, y = torch.cat(preds), torch.cat(labels)
    result = {n: METRICS[n](p, y) for n in names}
    if n_loss:
        result["loss"] = loss_sum / n_loss
    return result


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient, parameter or evaluation result.

    Raised by :func:`fit` before anything non-finite is checkpointed; ``step`` is the
    optimiser step at which it was found and ``last_checkpoint`` the newest good
    checkpoint (None without one).
    """

    def __init__(self, step: int, what: str, last_checkpoint: Path | None = None):
        self.step, self.what, self.last_checkpoint = step, what, last_checkpoint
        kept = (f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint is not None
                else "no checkpoint was written")
        super().__init__(f"training diverged at step {step}: {what}; nothing was saved from it and {kept} "
                         "(try a lower learning rate)")


def fit(
    model: torch.nn.Module, train_loader: DataLoader, *,
    eval_loader: DataLoader | None = None, eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    metric: str | Sequence[str] = "accuracy", lr: float = 1e-4, weight_decay: float = 0.0,
    max_steps: int | None = None, epochs: int | None = None, grad_accum: int = 1, schedule: Schedule = "linear",
    warmup_steps: int = 0, max_grad_norm: float | None = 1.0, eval_every: int | None = None, log_every: int = 10,
    ckpt_dir: str | Path | None = None, ckpt_every: int | None = None, keep_last: int = 2, resume: bool = True,
    seed: int = 0, progress: bool = True, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
    params: Mapping[str, torch.nn.Parameter] | None = None, callbacks: Sequence[Any] = (),
    autocast: torch.dtype | None = None, early_stopping_patience: int | None = None,
    early_stopping_metric: str | None = None, gradient_checkpointing: bool = False, compile: bool = False,
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` (or ``params``) on ``train_loader``.

    Give exactly one of ``max_steps`` / ``epochs`` (a step is one optimiser update of
    ``grad_accum`` batches). Evaluation runs every ``eval_every`` steps and at the end:
    ``eval_fn(model)`` or :func:`evaluate` on ``eval_loader`` with ``metric``. With
    ``ckpt_dir``, a checkpoint is written every ``ckpt_every`` steps and at the end, and
    with ``resume`` training continues from the newest one, bit for bit. Each of
    ``callbacks`` has ``on_step(step, model)`` called after every optimiser step; to
    resume from a checkpoint, each must either checkpoint its state
    (:class:`StatefulCallback`: ``state_dict()`` / ``load_state_dict()``, as AdaLoRA's,
    IncreLoRA's and LISA's do) or declare ``stateless = True``; any other callback makes
    resume an error, since fit cannot know whether a fresh one would behave as the old one.
    ``autocast=torch.bfloat16`` runs forwards in bf16 with fp32 master weights.
    ``gradient_checkpointing=True`` recomputes a transformers model's block activations in
    backward (non-reentrant) instead of storing them; it is switched off again afterwards.
    ``compile=True`` runs the training forward and loss through :func:`compile_model`
    (``torch.compile``; evaluation stays eager); a compiler failure is an error, not a fallback.
    ``early_stopping_patience=P`` stops after P evaluations without improving
    ``early_stopping_metric`` (default: the first of ``metric``) and leaves the best
    evaluated parameters in the model. A non-finite loss, gradient, parameter or
    evaluation raises :class:`TrainingDivergedError` naming the step.
    The module docstring says why each of these works the way it does, with an example.
    """
    _check_arguments(max_steps, epochs, grad_accum, log_every, early_stopping_patience, eval_every,
                     eval_fn is not None or eval_loader is not None)
    if eval_fn is None and eval_loader is not None:
        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            return evaluate(m, eval_loader, metric)
    run = _setup(model, train_loader, params, lr=lr, weight_decay=weight_decay, schedule=schedule,
                 warmup_steps=warmup_steps, max_steps=max_steps, epochs=epochs, grad_accum=grad_accum, seed=seed)
    run.ckpt_dir, run.progress = (Path(ckpt_dir) if ckpt_dir is not None else None), progress
    if compile:
        run.forward = compile_model(model)
    if early_stopping_patience is not None:
        name = early_stopping_metric or (metric if isinstance(metric, str) else metric[0])
        run.stopper = EarlyStopping(name if name.startswith("eval_") else f"eval_{name}", early_stopping_patience)
    _start(run, resume, seed, callbacks)
    bar = tqdm(total=run.total, initial=run.start, disable=not (progress and run.main and sys.stderr.isatty()),
               dynamic_ncols=True)
    was_training = model.training
    model.train()
    undo_checkpointing = _enable_gradient_checkpointing(model) if gradient_checkpointing else None
    try:
        _loop(run, bar, eval_fn, loss_fn=loss_fn, autocast=autocast, max_grad_norm=max_grad_norm,
              callbacks=callbacks, log_every=log_every, eval_every=eval_every, ckpt_every=ckpt_every,
              keep_last=keep_last)
    finally:
        bar.close()
        model.train(was_training)
        if undo_checkpointing is not None:
            undo_checkpointing()
    _finish(run, eval_fn)
    return TrainResult(history=run.history, metrics=run.metrics, steps=run.steps_done, best_step=run.best_step)


def _enable_gradient_checkpointing(model: torch.nn.Module) -> Callable[[], None] | None:
    """Turn on a transformers model's gradient checkpointing; returns how to turn it off again
    (None when it was already on, so ``fit`` leaves it as found).

    Non-reentrant (``use_reentrant=False``): the reentrant kind gives no gradient to the
    parameters inside a block whose inputs do not require grad, which is every adapter on a
    frozen base (peft works around it with ``enable_input_require_grads``). transformers 5
    renamed the methods to ``activation_checkpointing_*``; both spellings are accepted.
    The recompute also replays the forward's context variables (:func:`_replay_context`).
    """
    for prefix in ("activation", "gradient"):
        enable = getattr(model, f"{prefix}_checkpointing_enable", None)
        if enable is not None:
            break
    else:
        raise ValueError("expected a transformers model (with gradient_checkpointing_enable) for "
                         f"gradient_checkpointing=True, found {type(model).__name__}")
    if getattr(model, f"is_{prefix}_checkpointing", False):
        return None
    enable({"use_reentrant": False, "context_fn": _replay_context})
    return getattr(model, f"{prefix}_checkpointing_disable")


def _replay_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: the recompute in backward runs with the context
    variables the forward saw. Per-call routing (``deltakit.mixed_batch``) lives in a ContextVar
    and ``backward()`` usually runs after its block has closed; without this the recompute would
    take the base path and checkpoint would fail on the mismatch.
    """
    return contextlib.nullcontext(), _with_context_vars(contextvars.copy_context())


@contextlib.contextmanager
def _with_context_vars(saved: contextvars.Context) -> Iterator[None]:
    from deltakit.core.state import scopes_open  # the replayed routing must be read, not skipped

    tokens = [(var, var.set(value)) for var, value in saved.items()]
    try:
        with scopes_open():
            yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _check_arguments(max_steps: int | None, epochs: int | None, grad_accum: int, log_every: int,
                     patience: int | None, eval_every: int | None, has_eval: bool) -> None:
    if (max_steps is None) == (epochs is None):
        raise ValueError(f"expected exactly one of max_steps / epochs, found max_steps={max_steps}, epochs={epochs}")
    if grad_accum < 1 or log_every < 1:
        raise ValueError(f"expected grad_accum >= 1 and log_every >= 1, found {grad_accum} and {log_every}")
    if patience is not None and not (has_eval and eval_every):
        raise ValueError("expected eval_every and an eval_loader / eval_fn with early_stopping_patience, found "
                         f"eval_every={eval_every} and {'an' if has_eval else 'no'} evaluation")


@dataclass
class _Run:
    """Everything one :func:`fit` call trains with: its steps are small functions of it."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    sampler: ddp.ResumableSampler
    info: ddp.DistInfo
    device: torch.device
    total: int
    grad_accum: int
    config: dict[str, Any]
    ckpt_dir: Path | None = None
    progress: bool = True
    stopper: EarlyStopping | None = None
    start: int = 0
    steps_done: int = 0
    stopped_at: int | None = None  # the step early stopping ended the run at
    forward: Any = None  # what the training forward calls (compile_model(model)); None: the model
    window: list[float] = field(default_factory=list)  # losses since the last log line, kept across a resume
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.info.rank == 0

    @property
    def best_step(self) -> int | None:
        return self.stopper.best_step if self.stopper is not None and self.stopper.best is not None else None

    def diverged(self, step: int, what: str) -> TrainingDivergedError:
        last = ckpt.latest_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
        return TrainingDivergedError(step, what, last)


def _setup(model: torch.nn.Module, train_loader: DataLoader, params: Mapping[str, torch.nn.Parameter] | None, *,
           lr: float, weight_decay: float, schedule: Schedule, warmup_steps: int, max_steps: int | None,
           epochs: int | None, grad_accum: int, seed: int) -> _Run:
    """Process group, device, parameter set, sharded loader, optimiser and schedule."""
    info = ddp.setup_distributed()
    if info.device is not None:
        model.to(info.device)
    params = dict(params) if params is not None else trainable_parameters(model)
    if not params:
        raise ValueError("expected at least one parameter with requires_grad=True, found none")
    loader, sampler = ddp.shard_loader(train_loader, info.rank, info.world_size, seed)
    if len(loader) == 0:
        raise ValueError("expected a non-empty train_loader, found 0 batches")
    total = max_steps if max_steps is not None else epochs * math.ceil(len(loader) / grad_accum)
    optimizer = make_optimizer(params, lr, weight_decay)
    scheduler = make_scheduler(optimizer, schedule, warmup_steps, total)
    config = {"seed": seed, "grad_accum": grad_accum, "batch_size": loader.batch_size,
              "world_size": info.world_size, "lr": lr, "schedule": schedule, "total_steps": total}
    return _Run(model, params, optimizer, scheduler, loader, sampler, info, _model_device(model), total,
                grad_accum, config)


def _start(run: _Run, resume: bool, seed: int, callbacks: Sequence[Any]) -> None:
    """Resume from the newest checkpoint in ``run.ckpt_dir``, or seed a fresh run."""
    last = ckpt.latest_checkpoint(run.ckpt_dir) if run.ckpt_dir is not None else None
    if last is not None and not resume:  # pruning would delete the newer steps of the old run
        raise ValueError(f"expected an empty ckpt_dir with resume=False, found {last}; "
                         "pass resume=True to continue it or choose another directory")
    if last is None:
        torch.manual_seed(seed + run.info.rank)
        ddp.broadcast_parameters(run.params.values())
        return
    same_order = _state_matches(last, run.config, run.info.rank)
    _check_callbacks(last, callbacks)  # before anything is loaded into the model
    state = ckpt.load_checkpoint(last, run.params, run.optimizer, run.scheduler, rank=run.info.rank,
                                 restore_rng=same_order)
    extra = state["extra"]
    _restore_callbacks(last, extra.get("callbacks", []), state.get("extra_tensors", []), callbacks)
    run.start = run.steps_done = state["step"]
    run.history, run.metrics = extra.get("history", []), extra.get("metrics", {})
    run.stopped_at, run.window = extra.get("stopped_at"), extra.get("window", [])
    if run.stopper is not None and "early_stopping" in extra:
        best = ckpt.load_extra_tensors(last, "best") if "best" in state.get("extra_tensors", []) else {}
        run.stopper.load_state_dict(extra["early_stopping"], best)
    if not same_order:
        torch.manual_seed(seed + run.info.rank)
    if run.progress and run.main:
        print(f"resuming from {last} (step {run.start} of {run.total})", file=sys.stderr, flush=True)


def _stateful(callbacks: Sequence[Any]) -> list[StatefulCallback]:
    return [cb for cb in callbacks if isinstance(cb, StatefulCallback)]


def _check_callbacks(last: Path, callbacks: Sequence[Any]) -> None:
    """Refuse a resume that would lose a callback's state: an undeclared callback, or other
    stateful callbacks than the checkpoint holds state for (in order, by class)."""
    for cb in callbacks:
        if not isinstance(cb, StatefulCallback) and getattr(cb, "stateless", False) is not True:
            raise ValueError(f"cannot resume {last}: callback {type(cb).__name__} may hold state that is not "
                             "checkpointed; expected it to define state_dict() and load_state_dict(), or to "
                             "declare stateless = True")
    saved = read_json(last / "trainer_state.json").get("extra", {}).get("callbacks", [])
    want, found = [s["class"] for s in saved], [type(cb).__name__ for cb in _stateful(callbacks)]
    if want != found:
        raise ValueError(f"cannot resume {last}: expected the stateful callbacks {want} it was saved with, "
                         f"found {found}")


def _callback_states(callbacks: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """(JSON part of each stateful callback's state, its tensors as extra tensors ``callback-<i>``)."""
    meta, tensors = [], {}
    for i, cb in enumerate(_stateful(callbacks)):
        scalars, ts = ckpt.split_state(cb.state_dict(), f"{type(cb).__name__}.state_dict()")
        meta.append({"class": type(cb).__name__, "state": scalars})
        if ts:
            tensors[f"callback-{i}"] = ts
    return meta, tensors


def _restore_callbacks(last: Path, saved: list[dict[str, Any]], tensor_keys: list[str],
                       callbacks: Sequence[Any]) -> None:
    for i, (cb, s) in enumerate(zip(_stateful(callbacks), saved)):
        key = f"callback-{i}"
        tensors = ckpt.load_extra_tensors(last, key) if key in tensor_keys else {}
        cb.load_state_dict({**s["state"], **tensors})


def _batch_stream(run: _Run) -> Iterator[Batch]:
    """Endless micro-batches, starting where step ``run.start`` left off."""
    epoch, skip = divmod(run.start * run.grad_accum, len(run.loader))
    while True:
        run.sampler.set_epoch(epoch)
        run.sampler.skip = skip * run.loader.batch_size
        yield from run.loader
        epoch, skip = epoch + 1, 0


def _loop(run: _Run, bar: tqdm, eval_fn: Callable | None, *, loss_fn, autocast, max_grad_norm, callbacks,
          log_every: int, eval_every: int | None, ckpt_every: int | None, keep_last: int) -> None:
    """The steps from ``run.start + 1`` to the end (or an early stop), with logging, evals and checkpoints."""
    if run.stopped_at is not None:
        return
    stream, meter = _batch_stream(run), _Meter(run.total - run.start, run.window)
    for step in range(run.start + 1, run.total + 1):
        t = time.perf_counter()
        loss, tokens = _train_step(run, stream, step, loss_fn, autocast, max_grad_norm)
        for cb in callbacks:
            cb.on_step(step, run.model)
        run.steps_done = step
        meter.add(loss, tokens * run.info.world_size, time.perf_counter() - t)  # ranks see equal shares
        bar.update(1)
        bar.set_postfix(meter.postfix(run.scheduler.get_last_lr()[0]), refresh=False)
        last = step == run.total
        if step % log_every == 0 or last:
            _check_parameters(run, step)
            _log(run, step, meter)
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or last):
            _check_parameters(run, step)  # an early stop must not keep non-finite "best" parameters
            if _evaluate_step(run, step, eval_fn, bar):
                run.stopped_at = step
                if meter.losses:  # report the loss of the steps since the last log line too
                    _log(run, step, meter)
        if run.ckpt_dir is not None and ((ckpt_every and step % ckpt_every == 0) or last
                                         or run.stopped_at is not None):
            _check_parameters(run, step)
            _save(run, step, keep_last, meter.losses, callbacks)
        if run.stopped_at is not None:
            if run.progress and run.main:
                stop = run.stopper
                bar.write(f"early stop at step {step}: {stop.metric} has not improved on {stop.best:.4f} "
                          f"(step {stop.best_step}) for {stop.patience} evaluations")
            return


def _count_tokens(batch: Batch) -> int:
    """Non-padding tokens of a batch (from ``attention_mask``), else its ``input_ids`` size, else 0."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return ids.numel() if isinstance(ids, torch.Tensor) else 0


def _train_step(run: _Run, stream: Iterator[Batch], step: int, loss_fn, autocast: torch.dtype | None,
                max_grad_norm: float | None) -> tuple[float, int]:
    """One optimiser step of ``grad_accum`` micro-batches; returns (loss averaged over ranks, tokens)."""
    loss_step, tokens = 0.0, 0
    for _ in range(run.grad_accum):
        batch = next(stream)
        if isinstance(batch, Mapping):
            tokens += _count_tokens(batch)
        batch = to_device(batch, run.device)
        cast = torch.autocast(run.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with cast:
            loss = _forward_loss(run, batch, loss_fn).float() / run.grad_accum
        loss.backward()
        loss_step += loss.item()
    loss_step = _mean_over_ranks(loss_step, run.device)  # so every rank sees the same divergence
    if not math.isfinite(loss_step):
        raise run.diverged(step, f"the loss is {loss_step}")
    ddp.all_reduce_gradients(run.params.values())
    if max_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(run.params.values(), max_grad_norm)
        if not torch.isfinite(norm):
            raise run.diverged(step, f"the gradient norm is {norm.item()}")
    run.optimizer.step()
    torch.clear_autocast_cache()  # casts of the old weights, if an outer autocast block made any
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_step, tokens


def _forward_loss(run: _Run, batch: Batch, loss_fn) -> torch.Tensor:
    if run.forward is None:
        return compute_loss(run.model, batch, loss_fn)
    try:
        return compute_loss(run.forward, batch, loss_fn)
    except Exception as e:  # the compiler's errors are many and long: one line, the cause chained
        if not _is_compile_error(e):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise RuntimeError(f"fit(compile=True): torch.compile failed ({type(e).__name__}: {first[:300]}); "
                           "train without compile") from e


def _is_compile_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(e).__name__


def compile_model(model: torch.nn.Module, **options) -> torch.nn.Module:
    """``torch.compile(model, **options)``: what ``fit(compile=True)`` trains through.

    The returned module shares the model's parameters (the optimiser and checkpoints see
    the same tensors). Compilation happens at the first call. A model with adapters traces
    as one graph (a 2-block LoRA Llama: 1 graph, 0 breaks); inside ``disabled`` /
    ``mixed_batch`` the per-call routing is read from a ``ContextVar``, which dynamo cannot
    trace, so those calls recompile with a graph break per adapted layer (still correct).
    """
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"compile=True needs torch.compile (torch >= 2.0), found torch {torch.__version__}")
    return torch.compile(model, **options)


def _check_parameters(run: _Run, step: int) -> None:
    """Raise if any trainable parameter holds a NaN / inf (one device sync for all of them).

    The max-abs norm is NaN / inf exactly when the tensor holds one, and reduces without
    the bool copy ``isfinite(p).all()`` makes (3x faster on CPU).
    """
    norms = torch.stack([torch.linalg.vector_norm(p.detach(), float("inf")).float() if p.numel()
                         else p.new_zeros((), dtype=torch.float32) for p in run.params.values()])
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        bad = [n for n, ok in zip(run.params, finite.tolist()) if not ok]
        raise run.diverged(step, f"{len(bad)} of {len(run.params)} trainable parameters are not finite "
                                 f"(first: {bad[0]})")


class _Meter:
    """Loss and tokens since the last log line; throughput and ETA for the progress output.

    Tokens/s counts training steps only (an evaluation or checkpoint in the window would
    make the model look slower); the ETA uses wall time, as periodic evaluations recur.
    """

    def __init__(self, steps_left: int, losses: list[float]):
        self.t0 = time.perf_counter()
        self.steps_left, self.done = steps_left, 0
        self.losses = list(losses)
        self.tokens, self.seconds = 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds
        self.done += 1

    def rates(self) -> tuple[float, float]:
        """(tokens/s of the training steps in the window, seconds left at the wall time per step so far)."""
        eta = (time.perf_counter() - self.t0) / max(self.done, 1) * (self.steps_left - self.done)
        return self.tokens / max(self.seconds, 1e-9), eta

    def postfix(self, lr: float) -> dict[str, str]:
        loss = sum(self.losses) / len(self.losses) if self.losses else float("nan")
        return {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{self.rates()[0]:,.0f}"}

    def flush(self) -> tuple[float, float, float]:
        """(mean loss, tokens/s, seconds left) of the window, and start a new window."""
        tok_s, eta = self.rates()
        mean = sum(self.losses) / len(self.losses)
        self.losses, self.tokens, self.seconds = [], 0, 0.0
        return mean, tok_s, eta


def _log(run: _Run, step: int, meter: _Meter) -> None:
    mean, tok_s, eta = meter.flush()
    lr_now = run.scheduler.get_last_lr()[0]
    run.history.append({"step": step, "loss": mean, "lr": lr_now})
    run.metrics["train_loss"] = mean
    if run.progress and run.main and not sys.stderr.isatty():
        print(f"step {step}/{run.total} loss {mean:.4f} lr {lr_now:.2e} {tok_s:,.0f} tok/s "
              f"eta {tqdm.format_interval(eta)}", flush=True)


def _evaluate_step(run: _Run, step: int, eval_fn: Callable, bar: tqdm) -> bool:
    """Evaluate, record, and tell whether early stopping says stop."""
    results = {f"eval_{k}": float(v) for k, v in eval_fn(run.model).items()}
    run.model.train()
    if bad := {k: v for k, v in results.items() if not math.isfinite(v)}:
        raise run.diverged(step, f"the evaluation gave {bad}")
    run.metrics.update(results)
    run.history.append({"step": step, **results})
    if run.progress and run.main:
        bar.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in run.metrics.items()))
    return run.stopper is not None and run.stopper.update(step, results, run.params)


def _save(run: _Run, step: int, keep_last: int, window: list[float], callbacks: Sequence[Any]) -> None:
    rng = {f"{k}/{r}": t for k, v in ckpt.rng_state().items()
           for r, t in enumerate(ddp.all_gather_tensor(v, run.info.device))}
    if run.main:
        extra: dict[str, Any] = {"history": run.history, "config": run.config, "metrics": run.metrics,
                                 "stopped_at": run.stopped_at, "window": window}
        extra["callbacks"], tensors = _callback_states(callbacks)
        if run.stopper is not None:
            extra["early_stopping"] = run.stopper.state_dict()
            if run.stopper.best_params:
                tensors["best"] = run.stopper.best_params
        ckpt.save_checkpoint(run.ckpt_dir, run.params, run.optimizer, run.scheduler, step=step, rng=rng,
                             extra=extra, extra_tensors=tensors)
        ckpt.prune_checkpoints(run.ckpt_dir, keep_last)
    ddp.barrier()


def _finish(run: _Run, eval_fn: Callable | None) -> None:
    """Restore the best parameters after early stopping; report a resumed finished run's metrics again."""
    if run.stopper is not None and run.stopper.best is not None:
        run.stopper.restore(run.params)
        run.metrics.update(run.stopper.best_metrics)
    elif run.start >= run.total and eval_fn is not None:
        run.metrics.update({f"eval_{k}": float(v) for k, v in eval_fn(run.model).items()})
    if run.info.created_group:
        torch.distributed.destroy_process_group()


def _state_matches(path: Path, config: dict[str, Any], rank: int) -> bool:
    """True when a checkpoint was written by a run with the same data order; warn otherwise."""
    saved = read_json(path / "trainer_state.json").get("extra", {}).get("config", {})
    keys = ("seed", "grad_accum", "batch_size", "world_size")
    diff = {k: (saved.get(k), config[k]) for k in keys if saved.get(k) != config[k]}
    if diff and rank == 0:
        warnings.warn(f"resuming {path} with a different data order (saved vs now: {diff}); "
                      "the run will not match an uninterrupted one", stacklevel=3)
    return not diff


def _mean_over_ranks(x: float, device: torch.device) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()
