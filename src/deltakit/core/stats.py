"""Statistics from data: input Gram matrices of linear layers, diagonal Fisher of parameters.

One implementation each, shared by everything that needs them: RegMean and Fisher merging
(merge), CorDA's context covariance and SPT's gradient sensitivity (methods). They live in
core so that both the merge package and PEFT methods (which import core only) use the same code.
"""
from __future__ import annotations

import itertools

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .registry import ConfigError

__all__ = ["collect_grams", "estimate_fisher"]


def collect_grams(model: nn.Module, batches: Iterable[Any],
                  forward: Callable[[nn.Module, Any], Any] | None = None, *,
                  modules: Mapping[str, nn.Module] | None = None, mean: bool = False) -> dict[str, torch.Tensor]:
    """Input Gram matrices ``G = X^T X`` (in, in) for every ``nn.Linear``, keyed ``<module>.weight``
    (RegMean, Jin et al., 2023, https://arxiv.org/abs/2212.09849). Inputs (..., in) are flattened
    over batch and sequence; G is summed over all batches (fp64 accumulation, fp32 result).
    Padding does not count: when a batch is a mapping with an ``attention_mask`` (B, T),
    a linear layer's (B, T, in) inputs keep only the rows where the mask is set.

    ``modules`` (key -> module) hooks exactly those modules instead (any module whose first
    input is ``(..., in)``, e.g. GPT-2's Conv1D), keyed as given. ``mean=True`` divides each
    G by the number of input rows it saw: the uncentred covariance ``E[x x^T]``.
    """
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = current["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]  # (tokens, in), padding dropped
            x = x.reshape(-1, x.shape[-1]).double().cpu()
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    if modules is None:
        modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hooks = [m.register_forward_pre_hook(hook(key)) for key, m in modules.items()]
    fwd = forward or (lambda mod, b: mod(**b) if isinstance(b, Mapping) else mod(b))
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                fwd(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if mean:
        return {k: (v / max(rows[k], 1)).float() for k, v in grams.items()}
    return {k: v.float() for k, v in grams.items()}


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


def first_batches(model: nn.Module, loader: Iterable[Any] | None, n: int, *, method: str, purpose: str) -> list[Any]:
    """The first ``n`` batches of ``loader`` on ``model``'s device: what data-initialised methods
    (CorDA, SPT) calibrate on inside ``training_hooks``; one line naming ``method`` without data."""
    if loader is None:
        raise ConfigError(f"{method}: expected training data to {purpose}, found none")
    device = next(model.parameters()).device
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in itertools.islice(iter(loader), n)]
