"""CABS: conflict-aware and balanced sparsification (Yang et al., 2025) https://arxiv.org/abs/2503.01874

Tasks are pruned in order; each may only keep entries no earlier task kept (CA), and
keeps the n largest |tau| in every group of m consecutive entries (BS, n:m pruning):
``theta = theta_0 + sum_k lam_k (M_k * tau_k)`` with disjoint masks M_k.
Shapes: (K, *shape) -> (*shape); groups run over the flattened tensor.
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, ConfigError, knob
from .._parts import per_model
from .._registry import MergeConfigError, MergeContext, register_merge


@dataclass(frozen=True)
class CABSConfig(Checked):
    n: int = knob(1, ge=1, doc="entries each task keeps in every block of m (density n/m)")
    m: int = knob(4, ge=1, doc="block size of the n:m pattern (1:4 keeps 25% per task)")
    weights: tuple[float, ...] | None = knob(None, per_model=True, doc="per-model scale lam_k (default 1 each)")
    order: tuple[int, ...] | None = knob(
        None, ge=0, per_model=True, doc="pruning order: model indices in the order they claim entries "
                                        "(default: as given)")

    def validate(self) -> None:
        if self.n > self.m:
            raise ConfigError(f"CABSConfig.n: expected at most m={self.m}, found {self.n}")


@register_merge("cabs", paper="https://arxiv.org/abs/2503.01874", config=CABSConfig)
def cabs(x: torch.Tensor, base: torch.Tensor, cfg: CABSConfig, ctx: MergeContext) -> torch.Tensor:
    k = x.shape[0]
    lam = per_model(cfg.weights, k, 1.0, "weights")
    order = list(cfg.order) if cfg.order is not None else list(range(k))
    if sorted(order) != list(range(k)):
        raise MergeConfigError(f"order: expected a permutation of 0..{k - 1}, found {list(order)}")
    numel = base.numel()
    pad = -numel % cfg.m
    free = torch.ones(numel + pad, dtype=torch.bool)  # entries no earlier task has claimed
    free[numel:] = False
    merged = torch.zeros(numel, dtype=x.dtype)
    for i in order:
        tau = torch.nn.functional.pad(x[i].reshape(-1), (0, pad))
        score = torch.where(free, tau.abs(), torch.full_like(tau, -1.0)).reshape(-1, cfg.m)
        top = score.topk(cfg.n, dim=1).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
        keep &= score >= 0  # a group with fewer than n free entries keeps fewer
        keep = keep.reshape(-1)
        free &= ~keep
        merged += lam[i] * (tau * keep)[:numel]
    return base + merged.reshape(base.shape)
