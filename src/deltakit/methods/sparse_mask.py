"""Sparse fixed-mask deltas: ``dW = M ⊙ D``, M a fixed binary mask of density p.

Three ways to pick M, three registered names (one shared implementation,
:mod:`deltakit.methods._sparse_common`); only the ``k = round(p * numel)`` kept
entries are parameters, stored with their int32 positions:

* ``sparse_random`` - uniformly random positions from a seed (arbitrary-parameter
  PET; "random masking", Xu & Zhang 2024, https://arxiv.org/abs/2405.02596).
* ``sara`` - the smallest-``|W|`` entries, the "ineffective" parameters of SaRA
  (Hu et al., 2024) https://arxiv.org/abs/2409.06633. SaRA's optional low-rank
  constraint is :func:`sara_nuclear_loss` (add it to your loss). SaRA picks entries
  below a magnitude threshold; we pick a fixed fraction (``density``) of the
  smallest, so the budget is known up front, and we do not re-select progressively.
* ``sparse_grad`` - the largest accumulated ``|dL/dW|`` (or ``(dL/dW)^2``, the
  empirical Fisher of FISH masks, Sung et al. 2021, https://arxiv.org/abs/2111.09839)
  over a few batches (gradient sensitivity). The mask needs data, so attach, then :func:`calibrate` before training::

      ad = dk.attach(model, SparseGradConfig(density=0.01))
      calibrate(ad, batches, loss_fn)   # loss_fn(model, batch) -> scalar
      ...train...

  Until calibrated the adapter refuses to compute (no silent stand-in mask).

All start equal to the base (D = 0).

>>> import torch, deltakit as dk
>>> from deltakit.methods.sparse_mask import SparseRandomConfig
>>> m = torch.nn.Sequential(torch.nn.Linear(10, 10))
>>> ad = dk.attach(m, SparseRandomConfig(density=0.05, targets=["0"]))
>>> ad.num_parameters()
5
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, disabled
from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.registry import ConfigError, register_method
from ..core.seeding import generator
from ._sparse_common import SparseConfig, SparseMaskDelta, top_k

__all__ = ["SparseRandomConfig", "SaraConfig", "SparseGradConfig", "SparseRandom", "Sara", "SparseGrad",
           "calibrate", "sara_nuclear_loss"]


@dataclass(frozen=True)
class SparseRandomConfig(SparseConfig):
    """Random fixed mask."""

    seed: int = knob(0, doc="mask seed (each target mixes in its module path)")


@dataclass(frozen=True)
class SaraConfig(SparseConfig):
    """SaRA: train the smallest-magnitude entries.

    Attributes:
        density: fraction of entries trained per target (the smallest ``|W|``).
    """


@dataclass(frozen=True)
class SparseGradConfig(SparseConfig):
    """Gradient-sensitivity mask (set by :func:`calibrate`)."""

    score: Literal["abs", "fisher"] = knob(
        "abs", doc="per-entry sensitivity summed over batches: ``abs`` = ``|grad|``, ``fisher`` = ``grad^2`` "
                   "(FISH)")
    calibration_batches: int = knob(4, ge=1, doc="training batches whose gradients score the entries")


@register_method("sparse_random", SparseRandomConfig, paper="https://arxiv.org/abs/2405.02596",
                 description="train a seeded random fixed subset (density p) of each weight's entries")
class SparseRandom(SparseMaskDelta):
    def select(self, base: nn.Module, config: SparseRandomConfig, ctx: BuildContext, k: int) -> Tensor:
        g = generator(config.seed, ctx.name, scheme="path")
        return torch.sort(torch.randperm(base.weight.numel(), generator=g)[:k]).values


@register_method("sara", SaraConfig, paper="https://arxiv.org/abs/2409.06633",
                 description="SaRA: train the smallest-|W| fraction p of each weight (optional nuclear-norm loss)")
class Sara(SparseMaskDelta):
    def select(self, base: nn.Module, config: SaraConfig, ctx: BuildContext, k: int) -> Tensor:
        return top_k(-base.weight.detach().abs(), k)


@register_method("sparse_grad", SparseGradConfig, paper="https://arxiv.org/abs/2111.09839",
                 description="train the top-|grad| fraction p of each weight, mask from calibrate()")
class SparseGrad(SparseMaskDelta):
    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """Masks come from gradients of the base on the first ``calibration_batches`` batches."""
        import itertools

        if loader is None:
            raise ConfigError("sparse_grad: expected training data to calibrate its masks, found none")
        device = next(adapter.model.parameters()).device
        n = adapter.config.calibration_batches
        batches = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()}
                   for b in itertools.islice(iter(loader), n)]
        # the model's own loss (Hugging Face models with labels), as fit's default; methods sit
        # below train/ in the package DAG, so this does not call train.compute_loss
        calibrate(adapter, batches, lambda m, b: m(**b).loss)
        return None, []

    @classmethod
    def contract_config(cls, kind: str) -> None:
        # needs data (calibrate) before it computes anything; its own tests cover the contract
        return None

    def select(self, base: nn.Module, config: SparseGradConfig, ctx: BuildContext, k: int) -> Tensor:
        return torch.full((k,), -1, dtype=torch.long)  # "not calibrated" until calibrate() runs


def calibrate(adapter: Adapter, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor]) -> dict[str, Tensor]:
    """Set a ``sparse_grad`` adapter's masks from accumulated ``|dL/dW|`` (or squared) of the base.

    Runs ``loss_fn(model, batch).backward()`` with every adapter disabled (the base
    function), accumulates ``|grad|`` of each target's weight over ``batches``, keeps
    the top ``k`` per target. The model's ``requires_grad`` flags and ``.grad`` are
    restored. Returns the scores by target path (for inspection).
    """
    if adapter.spec.name != "sparse_grad":
        raise ConfigError(f"calibrate: expected a 'sparse_grad' adapter, found method {adapter.spec.name!r}")
    model = adapter.model
    layers = dict(adapter.layers())
    weights = {p: layer.base.weight for p, layer in layers.items()}
    if any(layer.merged for layer in layers.values()):
        raise ConfigError("calibrate: unmerge the model's adapters first (the base weights must be original)")
    flags = {p: w.requires_grad for p, w in weights.items()}
    saved = {p: w.grad for p, w in weights.items()}
    scores = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
    fisher = adapter.config.score == "fisher"
    n = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with disabled(model):
            for batch in batches:
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for (p, _), g in zip(weights.items(), grads):
                    if g is not None:
                        g = g.detach().float()
                        scores[p] += g.abs() if fisher is False else g * g
                n += 1
    finally:
        for p, w in weights.items():
            w.requires_grad_(flags[p])
            w.grad = saved[p]
    if n == 0:
        raise ValueError("calibrate: expected at least one batch, found none")
    for p, layer in layers.items():
        d = layer.deltas[adapter.name]
        d.set_indices(top_k(scores[p], d.indices.numel()))
    return scores


def sara_nuclear_loss(adapter: Adapter) -> Tensor:
    """SaRA's low-rank constraint: ``sum_t ||dW_t||_*`` (nuclear norms of the sparse deltas,
    each viewed as ``(out, -1)``); differentiable w.r.t. the values. Scale it yourself."""
    total = None
    for _, d in adapter.deltas():
        dw = d.delta({})["weight"]
        term = torch.linalg.matrix_norm(dw.reshape(dw.shape[0], -1), ord="nuc")
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"adapter {adapter.name!r} has no targets")
    return total
