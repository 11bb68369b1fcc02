"""Weight averaging / model soups (Wortsman et al., 2022) https://arxiv.org/abs/2203.05482

``theta = sum_k w_k theta_k / sum_k w_k`` (or the plain weighted sum when not normalized).
Shapes: theta (K, *shape) -> (*shape). Works on weights, not task vectors.
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._parts import per_model
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class LinearConfig(Checked):
    weights: tuple[float, ...] | None = knob(None, per_model=True, doc="per-model weight (default 1 each)")
    normalize: bool = knob(True, doc="divide by the sum of the weights")


def coefficients(cfg: LinearConfig, k: int) -> list[float]:
    """theta = sum_k c_k theta_k."""
    w = per_model(cfg.weights, k, 1.0, "weights")
    if cfg.normalize:
        total = sum(w)
        if abs(total) < 1e-12:
            raise ValueError(f"weights: expected a non-zero sum when normalize=true, found {w}")
        w = [wk / total for wk in w]
    return w


@register_merge("linear", paper="https://arxiv.org/abs/2203.05482", config=LinearConfig, inputs="weights",
                linear_form=coefficients)
def linear(x: torch.Tensor, base: torch.Tensor, cfg: LinearConfig, ctx: MergeContext) -> torch.Tensor:
    w = coefficients(cfg, x.shape[0])
    # one gemv pass over the (K, n) stack instead of K multiply-adds
    coef = torch.tensor(w, dtype=x.dtype)
    return (coef @ x.reshape(x.shape[0], -1)).reshape(x.shape[1:])
