"""The training loop: short and flat, so it can be read top to bottom and copied.

:func:`fit` trains exactly the parameters with ``requires_grad=True`` (after
``deltakit.attach`` that is the adapter) with AdamW, a warmup + constant / linear /
cosine schedule, gradient accumulation and clipping, periodic evaluation, atomic
checkpoints that resume bit-for-bit, and data parallelism under ``torchrun``. The
building blocks it calls (:func:`trainable_parameters`, :func:`make_optimizer`,
:func:`make_scheduler`, :func:`compute_loss`, :func:`evaluate`, and the modules
``checkpoint`` / ``distributed``) are public so an edited copy stays short.

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
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deltakit.io.files import read_json
from deltakit.train import checkpoint as ckpt
from deltakit.train import distributed as ddp
from deltakit.train.metrics import METRICS

__all__ = ["fit", "TrainResult", "evaluate", "trainable_parameters", "make_optimizer",
           "make_scheduler", "compute_loss", "to_device", "Schedule"]

Schedule = Literal["constant", "linear", "cosine"]
Batch = Mapping[str, Any]


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    ``history``: one dict per log / eval event, e.g. ``{"step": 10, "loss": 0.61, "lr": 1e-4}``
    or ``{"step": 50, "eval_accuracy": 0.82}``. ``metrics``: the last evaluation (keys
    ``eval_*``) plus ``train_loss`` (mean over the last log window). ``steps``: optimiser
    steps taken in total (including those before a resume).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0


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


def fit(
    model: torch.nn.Module,
    train_loader: DataLoader,
    *,
    eval_loader: DataLoader | None = None,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    metric: str | Sequence[str] = "accuracy",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    epochs: int | None = None,
    grad_accum: int = 1,
    schedule: Schedule = "linear",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    eval_every: int | None = None,
    log_every: int = 10,
    ckpt_dir: str | Path | None = None,
    ckpt_every: int | None = None,
    keep_last: int = 2,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
    params: Mapping[str, torch.nn.Parameter] | None = None,
    callbacks: Sequence[Any] = (),
    autocast: torch.dtype | None = None,
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` on ``train_loader``.

    Give exactly one of ``max_steps`` / ``epochs`` (a step is one optimiser update of
    ``grad_accum`` batches). ``train_loader`` is rebuilt with a seeded, rank-sharded
    sampler (shuffled iff it was shuffled), so the data order is a function of ``seed``
    and the step, which is what makes resume exact and ``torchrun`` runs equal to one
    process with the global batch. Evaluation runs every ``eval_every`` steps and at the
    end: ``eval_fn(model)`` or :func:`evaluate` on ``eval_loader`` with ``metric``.
    With ``ckpt_dir``, a checkpoint is written every ``ckpt_every`` steps and at the end,
    and with ``resume`` training continues from the newest one.
    ``params`` (default: every ``requires_grad`` parameter) fixes the optimised set up
    front, for schedules that freeze and unfreeze parts while training (LISA: pass
    ``dict(adapter.named_parameters())``). Each of ``callbacks`` has
    ``on_step(step, model)`` called after every optimiser step (AdaLoRA / IncreLoRA
    budgets, LISA's layer sampling).

    ``autocast=torch.bfloat16`` (or float16) runs each forward and loss under
    ``torch.autocast`` with fp32 master weights; backward and the optimiser step run
    outside it. Calling ``fit`` inside your own ``torch.autocast`` block also works:
    autocast caches the low-precision copy of every weight for the life of the block,
    so ``fit`` clears that cache after each optimiser step; without that, the forward
    would keep using the weights as they were before training.

    Under ``torchrun`` gradients of the trainable parameters are averaged over processes
    (see :mod:`deltakit.train.distributed` for why not DDP), only rank 0 prints and writes
    checkpoints, and every rank evaluates the whole eval set (the models are identical,
    so are the numbers). Logged losses are averaged over ranks.
    See the module docstring for an example.
    """
    if (max_steps is None) == (epochs is None):
        raise ValueError(f"expected exactly one of max_steps / epochs, found max_steps={max_steps}, epochs={epochs}")
    if grad_accum < 1 or log_every < 1:
        raise ValueError(f"expected grad_accum >= 1 and log_every >= 1, found {grad_accum} and {log_every}")
    if eval_fn is None and eval_loader is not None:
        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            return evaluate(m, eval_loader, metric)

    info = ddp.setup_distributed()
    if info.device is not None:
        model.to(info.device)
    device = _model_device(model)
    params = dict(params) if params is not None else trainable_parameters(model)
    if not params:
        raise ValueError("expected at least one parameter with requires_grad=True, found none")
    loader, sampler = ddp.shard_loader(train_loader, info.rank, info.world_size, seed)
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise ValueError("expected a non-empty train_loader, found 0 batches")
    total = max_steps if max_steps is not None else epochs * math.ceil(batches_per_epoch / grad_accum)
    optimizer = make_optimizer(params, lr, weight_decay)
    scheduler = make_scheduler(optimizer, schedule, warmup_steps, total)
    config = {"seed": seed, "grad_accum": grad_accum, "batch_size": loader.batch_size,
              "world_size": info.world_size, "lr": lr, "schedule": schedule, "total_steps": total}

    start, history = 0, []
    last = ckpt.latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if last is not None and not resume:  # pruning would delete the newer steps of the old run
        raise ValueError(f"expected an empty ckpt_dir with resume=False, found {last}; "
                         "pass resume=True to continue it or choose another directory")
    if last is not None:
        same_order = _state_matches(last, config, info.rank)
        state = ckpt.load_checkpoint(last, params, optimizer, scheduler, rank=info.rank, restore_rng=same_order)
        start, history = state["step"], state["extra"].get("history", [])
        if not same_order:
            torch.manual_seed(seed + info.rank)
    else:
        torch.manual_seed(seed + info.rank)
        ddp.broadcast_parameters(params.values())

    def batch_stream():  # endless micro-batches, starting where step `start` left off
        epoch, skip = divmod(start * grad_accum, batches_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            sampler.skip = skip * loader.batch_size
            yield from loader
            epoch, skip = epoch + 1, 0

    def save(step: int) -> None:
        rng = {f"{k}/{r}": t for k, v in ckpt.rng_state().items()
               for r, t in enumerate(ddp.all_gather_tensor(v, info.device))}
        if info.rank == 0:
            ckpt.save_checkpoint(ckpt_dir, params, optimizer, scheduler, step=step, rng=rng,
                                 extra={"history": history, "config": config})
            ckpt.prune_checkpoints(ckpt_dir, keep_last)
        ddp.barrier()

    main = info.rank == 0
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, initial=start, disable=not (progress and main and tty), dynamic_ncols=True)
    was_training = model.training
    model.train()
    stream = batch_stream()
    window: list[float] = []
    metrics: dict[str, float] = {}
    for step in range(start + 1, total + 1):
        loss_step = 0.0
        for _ in range(grad_accum):
            batch = to_device(next(stream), device)
            with (torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()):
                loss = compute_loss(model, batch, loss_fn).float() / grad_accum
            loss.backward()
            loss_step += loss.item()
        ddp.all_reduce_gradients(params.values())
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params.values(), max_grad_norm)
        optimizer.step()
        torch.clear_autocast_cache()  # casts of the old weights, if an outer autocast block made any
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for cb in callbacks:
            cb.on_step(step, model)
        window.append(loss_step)
        bar.update(1)

        if step % log_every == 0 or step == total:
            mean = _mean_over_ranks(sum(window) / len(window), device)
            lr_now = scheduler.get_last_lr()[0]
            history.append({"step": step, "loss": mean, "lr": lr_now})
            metrics["train_loss"] = mean
            window = []
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr_now:.2e}")
            if progress and main and not tty:
                print(f"step {step}/{total} loss {mean:.4f} lr {lr_now:.2e}", flush=True)
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == total):
            metrics.update({f"eval_{k}": float(v) for k, v in eval_fn(model).items()})
            history.append({"step": step, **{k: v for k, v in metrics.items() if k.startswith("eval_")}})
            if progress and main:
                bar.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            model.train()
        if ckpt_dir is not None and ((ckpt_every and step % ckpt_every == 0) or step == total):
            save(step)
    bar.close()
    model.train(was_training)
    if start >= total and eval_fn is not None:  # resumed a finished run: report its metrics again
        metrics.update({f"eval_{k}": float(v) for k, v in eval_fn(model).items()})
    if info.created_group:
        torch.distributed.destroy_process_group()
    return TrainResult(history=history, metrics=metrics, steps=max(start, total))


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
