"""Data statistics some merge methods need: diagonal Fisher and linear-layer Gram matrices.

They need a model and data, so they live here, not in the pure methods. The results are
plain ``name -> tensor`` dicts; :func:`stack_stats` turns one dict per model into the
``stats_for(name)`` callable the executor passes to a method.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

# one collector for every data-statistics user (RegMean here, CorDA in methods/)
from ..core.stats import collect_grams

__all__ = ["estimate_fisher", "collect_grams", "stack_stats"]


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    return out.loss if hasattr(out, "loss") else out


def estimate_fisher(model: nn.Module, batches: Iterable[Any],
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = _default_loss,
                    names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``F = mean_b (d loss_b / d theta)^2`` (Matena & Raffel, 2022,
    https://arxiv.org/abs/2111.09832). Use batches of one example for the per-example estimate.

    Returns fp32 CPU tensors shaped like each parameter; the model's grads are cleared after.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.detach().float().cpu() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("estimate_fisher: expected at least one batch, found none")
    return {n: a / count for n, a in acc.items()}


def stack_stats(kind: str, per_model: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[str], dict[str, torch.Tensor]]:
    """``stats_for(name) -> {kind: (K, ...)}`` when every model has ``name``, else ``{}``."""
    def stats_for(name: str) -> dict[str, torch.Tensor]:
        if all(name in s for s in per_model):
            return {kind: torch.stack([s[name] for s in per_model])}
        return {}
    return stats_for
