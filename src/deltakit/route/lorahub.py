"""LoraHub: weights over K library LoRAs for a new task from a few examples, gradient-free.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
https://arxiv.org/abs/2307.13269 (code: https://github.com/sail-sg/lorahub).

*Compose* (the paper's, our default): one LoRA whose factors are the weighted sums of the K
LoRAs' factors, element-wise, per layer::

    A = sum_i w_i A_i,   B = sum_i w_i B_i,   dW = s * B @ A          # s = alpha / r, shared

so the composed update has the cross terms ``w_i w_j B_i A_j``; it costs one LoRA at inference
and is a normal adapter (save, merge, add to a library with lineage ``"lorahub"``). It needs
the K adapters to be plain LoRAs of one rank, one scale and one set of targets (refused
otherwise). *Adapt*: ``w`` minimises ``mean few-shot loss + 0.05 * sum_i |w_i|`` (the paper's
L1 term), starting at ``w = 0`` (the base model), each ``w_i`` in ``[-1.5, 1.5]``, for a
budget of 40 loss evaluations, all as in the paper's code.

*Mix* (an option, ``mode="mix"``): the outputs are mixed instead, ``base(x) + sum_i w_i
delta_i(x)`` through :func:`deltakit.routed` (dW = sum_i w_i dW_i, no cross terms); any ranks,
scales and targets, K LoRA branches at inference. Compose is the default because it is what
the paper evaluates and serves as one adapter.

Optimiser: CMA-ES from the ``cmaes`` package (the paper uses nevergrad's NGOpt, which picks
CMA-ES for this budget; nevergrad is not installed here). Differences, on purpose: ``sigma0``
is ours (0.5, a third of the half-width), the start ``w = 0`` is evaluated first (so the result
is never worse than the base on the few-shot objective), and the best point evaluated is
returned rather than the optimiser's final mean.

>>> hub = LoraHub.fit(model, ["sst2", "qnli", "trec"], batches, iterations=40)   # doctest: +SKIP
>>> hub.weights                                       # (K,)                       # doctest: +SKIP
>>> with hub.scope(model, batch): out = model(**batch)                           # doctest: +SKIP
>>> dk.save_adapter(dk.get_adapter(model, hub.composed_name), "runs/new-task")     # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.adapter import Adapter, active, adapters, attach, detach, get_adapter, routed, set_active
from ..io.adapter_files import save_adapter
from ..methods.lora import lora_scale
from ..train.loop import compute_loss
from ._base import Router, RoutingError, register_router

__all__ = ["LoraHub", "compose_factors", "compose", "L1", "BOUNDS"]

L1 = 0.05  # the paper code's regulariser: 0.05 * sum |w|
BOUNDS = (-1.5, 1.5)
Mode = Literal["compose", "mix"]
Batch = Mapping[str, Any]


def compose_factors(factors: Sequence[Mapping[str, tuple[Tensor, Tensor]]], weights: Sequence[float] | Tensor
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """``{path: (sum_i w_i A_i, sum_i w_i B_i)}`` from K mappings ``path -> (A_i, B_i)`` (pure).

    Every mapping must have the same paths and, per path, the same shapes (equal ranks); sums
    run in float32 (float64 for float64 factors) and come back in the first mapping's dtypes."""
    out = _combine(_stack(factors), weights)
    return {p: (A.to(factors[0][p][0].dtype), B.to(factors[0][p][1].dtype)) for p, (A, B) in out.items()}


def _stack(factors: Sequence[Mapping[str, tuple[Tensor, Tensor]]]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{path: (A (K, r, in), B (K, out, r))}``, built once per fit, in float32 at least (8 SmolLM2
    LoRAs of rank 16 on every linear layer: ~160 MB; float64 would double it for nothing)."""
    if not factors:
        raise RoutingError("compose: expected at least one adapter, found none")

    def stack(ts: list[Tensor]) -> Tensor:
        return torch.stack([t.to(torch.promote_types(t.dtype, torch.float32)) for t in ts])

    return {p: (stack([f[p][0] for f in factors]), stack([f[p][1] for f in factors])) for p in factors[0]}


def _combine(stacks: Mapping[str, tuple[Tensor, Tensor]], weights: Sequence[float] | Tensor
             ) -> dict[str, tuple[Tensor, Tensor]]:
    first = next(iter(stacks.values()))[0]
    k = first.shape[0]
    w = torch.as_tensor(weights, dtype=first.dtype).to(first.device)  # the factors may live on a GPU
    if w.dim() != 1 or w.numel() != k:
        raise RoutingError(f"compose: expected {k} weights (one per adapter), found shape {tuple(w.shape)}")
    return {p: (torch.tensordot(w, As, 1), torch.tensordot(w, Bs, 1)) for p, (As, Bs) in stacks.items()}


def _lora_factors(adapter: Adapter) -> dict[str, tuple[Tensor, Tensor]]:
    return {p: (d.lora_A.detach(), d.lora_B.detach()) for p, d in adapter.deltas()}


def _check_composable(ads: Sequence[Adapter]) -> None:
    """Compose needs plain LoRAs of one rank, one scale and one target set (one-line errors)."""
    first = ads[0]
    for a in ads:
        if a.spec.name != "lora":
            raise RoutingError(f"lorahub compose: expected LoRA adapters, found {a.name!r} ({a.spec.name}); "
                               "use mode='mix' for other methods")
        if a.config.r != first.config.r or lora_scale(a.config) != lora_scale(first.config):
            raise RoutingError(f"lorahub compose: expected one rank and scale, found {first.name!r} r={first.config.r} "
                               f"scale={lora_scale(first.config):g} and {a.name!r} r={a.config.r} "
                               f"scale={lora_scale(a.config):g}; use mode='mix' for mixed ranks")
        if set(dict(a.deltas())) != set(dict(first.deltas())):
            raise RoutingError(f"lorahub compose: expected the same targets, {first.name!r} and {a.name!r} differ; "
                               "use mode='mix' for mixed targets")


class _Composer:
    """The composed LoRA attached to the model, rewritten in place for each candidate ``w``."""

    def __init__(self, model: nn.Module, names: Sequence[str], out_name: str) -> None:
        ads = [get_adapter(model, n) for n in names]
        _check_composable(ads)
        self.stacks = _stack([_lora_factors(a) for a in ads])
        cfg = dataclasses.replace(ads[0].config, targets=tuple(self.stacks), modules_to_save=(), layers=None,
                                  exclude=(), target_types=None)
        if out_name in adapters(model):
            raise RoutingError(f"lorahub: an adapter named {out_name!r} is already attached; pick another name")
        with torch.random.fork_rng(devices=[]):  # the init draws are overwritten: keep the caller's RNG
            self.adapter = attach(model, cfg, name=out_name, activate=False)

    def set(self, weights: Sequence[float] | Tensor) -> Adapter:
        with torch.no_grad():
            for path, (A, B) in _combine(self.stacks, weights).items():
                d = self.adapter.model.get_submodule(path).deltas[self.adapter.name]
                d.lora_A.copy_(A)
                d.lora_B.copy_(B)
        return self.adapter


def compose(model: nn.Module, names: Sequence[str], weights: Sequence[float] | Tensor, *,
            name: str = "lorahub") -> Adapter:
    """Attach (inactive) a LoRA named ``name`` with ``A = sum w_i A_i, B = sum w_i B_i`` over the
    attached LoRAs ``names``; returns it (a normal adapter: save, merge, activate)."""
    return _Composer(model, names, name).set(weights)


def _constant(w: Tensor) -> Callable[[nn.Module, Tensor], Tensor]:
    """Per-layer weights ``(..., K)``: the same ``w`` for every token of every row (an Embedding's
    input is token ids: its weights stay float)."""
    def fn(layer: nn.Module, x: Tensor) -> Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        lead = x.shape[:-1] if x.is_floating_point() else x.shape
        return w.to(device=x.device, dtype=dtype).expand(*lead, w.numel())
    return fn


@contextlib.contextmanager
def _only(model: nn.Module, name: str) -> Iterator[None]:
    """``name`` alone active for the block (the fit evaluates the composed LoRA by itself)."""
    before = active(model)
    set_active(model, [name])
    try:
        yield
    finally:
        set_active(model, before)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: the objective must be deterministic) and no autograd, restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _mean_loss(model: nn.Module, batches: Sequence[Batch], loss_fn) -> float:
    return sum(float(compute_loss(model, b, loss_fn)) for b in batches) / len(batches)


def _cma_search(objective: Callable[[np.ndarray], float], k: int, *, iterations: int, seed: int, sigma0: float,
                bounds: tuple[float, float], progress: bool) -> tuple[np.ndarray, float, list[float]]:
    """``cmaes`` ask / tell from ``w = 0`` for ``iterations`` evaluations (the first one is
    ``w = 0`` itself) -> (best w, best value, every value in order)."""
    from ..merge._evolve import cma_ask_tell

    bar = _Progress(iterations, progress)
    pairs = [(np.zeros(k), objective(np.zeros(k)))]
    bar.update(pairs[0][1])
    best = [pairs[0][1]]  # the best value so far, for the progress line

    def seen(v: float) -> None:
        best[0] = min(best[0], v)
        bar.update(best[0])

    pairs += cma_ask_tell(objective, np.zeros(k), budget=iterations - 1, sigma0=sigma0, bounds=bounds, seed=seed,
                          on_value=seen)
    bar.close()
    x, v = min(pairs, key=lambda p: p[1])  # the first of equal values, w = 0 included
    return x, v, [p[1] for p in pairs]


class _Progress:
    """A tqdm bar on a terminal; otherwise (logs, CI) a line every 10 evaluations and at the end,
    as the training loop does."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="lorahub (CMA-ES)", disable=not self.tty)

    def update(self, best: float) -> None:
        self.done += 1
        self.bar.update(1)
        self.bar.set_postfix(best=f"{best:.4f}")
        if self.enabled and not self.tty and (self.done % 10 == 0 or self.done == self.total):
            print(f"lorahub: {self.done}/{self.total} evaluations, best objective {best:.4f}", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        self.bar.close()


@register_router("lorahub")
@dataclass
class LoraHub(Router):
    """Fixed weights ``weights`` (K,) over the K attached adapters ``names`` (see the module doc).

    ``mode="compose"``: the composed LoRA is attached as ``composed_name`` and the scope runs it
    alone; ``mode="mix"``: the scope mixes the K adapters' outputs with ``weights``.
    ``history``: the objective (mean loss + L1 term) of every evaluation, in order.
    """

    weights: Tensor = field(default_factory=lambda: torch.zeros(0))
    mode: Mode = "compose"
    composed_name: str = "lorahub"
    history: list[float] = field(default_factory=list)
    best: float = float("nan")

    @classmethod
    def fit(cls, model: nn.Module, names: Sequence[str], batches: Iterable[Batch], *, loss_fn=None,
            iterations: int = 40, seed: int = 0, mode: Mode = "compose", l1: float = L1,
            bounds: tuple[float, float] = BOUNDS, sigma0: float = 0.5, composed_name: str = "lorahub",
            progress: bool = True) -> LoraHub:
        """Find ``w`` for the few-shot ``batches`` (dicts the model takes; ``loss_fn(model, batch)``
        or the model's ``.loss``). Compose mode leaves the composed LoRA attached (inactive) at
        the best ``w``; ``model``'s active set and train / eval mode are as they were."""
        names, batches = tuple(names), list(batches)
        _check_fit_args(model, names, batches, iterations, mode, bounds)
        composer = _Composer(model, names, composed_name) if mode == "compose" else None

        def objective(x: np.ndarray) -> float:
            w = torch.as_tensor(x, dtype=torch.float32)
            return _objective(model, names, composer, w, batches, loss_fn) + l1 * float(np.abs(x).sum())

        try:
            with _evaluating(model):
                x, v, history = _cma_search(objective, len(names), iterations=iterations, seed=seed,
                                            sigma0=sigma0, bounds=bounds, progress=progress)
        except BaseException:
            if composer is not None:  # no half-fitted adapter left behind
                detach(model, composed_name)
            raise
        w = torch.as_tensor(x, dtype=torch.float32)
        if composer is not None:
            composer.set(w)
        return cls(names=names, weights=w, mode=mode, composed_name=composed_name, history=history, best=v)

    def describe(self) -> str:
        ws = ", ".join(f"{n}={float(w):.3f}" for n, w in zip(self.names, self.weights))
        return (f"lorahub ({self.mode}): {ws}; best objective {self.best:.4f} after {len(self.history)} "
                "evaluations")

    def weights_for(self, model: nn.Module, batch: Batch) -> Tensor:
        """The fixed weights for every row, ``(B, K)``."""
        return self.weights.reshape(1, -1).expand(_rows(batch), -1)

    @contextlib.contextmanager
    def scope(self, model: nn.Module, batch: Batch) -> Iterator[None]:
        self.record(self.weights_for(model, batch))
        if self.mode == "mix":
            with routed(model, self.names, _constant(self.weights)):
                yield
            return
        if self.composed_name not in adapters(model):  # e.g. a router fitted on another model object
            compose(model, self.names, self.weights, name=self.composed_name)
        with routed(model, (self.composed_name,), _constant(torch.ones(1))):
            yield

    def add_to_library(self, lib, model: nn.Module, parents: Sequence[str], *, name: str,
                       task: str | None = None, description: str | None = None,
                       tags: Iterable[str] = ("lorahub",)):
        """Save the composed LoRA into ``lib`` as ``name`` with lineage ``(parent, "lorahub")`` for
        each library entry ``parents`` (the refs of ``names``, in order). Returns the Entry."""
        if self.mode != "compose" or self.composed_name not in adapters(model):
            raise RoutingError(f"lorahub: expected a composed LoRA {self.composed_name!r} on the model "
                               f"(mode='compose'), found mode={self.mode!r}")
        if len(parents) != len(self.names):
            raise RoutingError(f"lorahub: expected {len(self.names)} parent refs, found {len(parents)}")
        with tempfile.TemporaryDirectory(prefix="deltakit-lorahub-") as tmp:
            out = save_adapter(get_adapter(model, self.composed_name), Path(tmp) / name)
            return lib.add(out, model=model, name=name, task=task, description=description, tags=tags,
                           lineage=[(p, "lorahub") for p in parents])


def _objective(model, names, composer: _Composer | None, w: Tensor, batches, loss_fn) -> float:
    """Mean few-shot loss with weights ``w``: the composed LoRA alone, or the K outputs mixed."""
    if composer is not None:
        composer.set(w)
        with _only(model, composer.adapter.name):
            return _mean_loss(model, batches, loss_fn)
    with routed(model, names, _constant(w)):
        return _mean_loss(model, batches, loss_fn)


def _rows(batch: Batch) -> int:
    t = next((v for v in batch.values() if isinstance(v, Tensor) and v.dim() >= 1), None)
    return t.shape[0] if t is not None else 1


def _check_fit_args(model, names, batches, iterations, mode, bounds) -> None:
    known = adapters(model)
    missing = [n for n in names if n not in known]
    if not names or missing:
        raise RoutingError(f"lorahub: expected attached adapters, found unknown {missing or 'none given'}; "
                           f"attached: {sorted(known)}")
    if not batches:
        raise RoutingError("lorahub: expected at least one few-shot batch, found none")
    if iterations < 1:
        raise RoutingError(f"lorahub: expected iterations >= 1, found {iterations}")
    if mode not in ("compose", "mix"):
        raise RoutingError(f"lorahub: expected mode 'compose' or 'mix', found {mode!r}")
    if not bounds[0] <= 0 <= bounds[1]:
        raise RoutingError(f"lorahub: expected bounds around the start w = 0, found {bounds}")
