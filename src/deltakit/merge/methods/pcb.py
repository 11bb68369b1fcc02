"""PCB-Merging: parameter competition balancing (Du et al., 2024) https://arxiv.org/abs/2410.02396

Per parameter, with tau (K, n) clipped at the [q, 1-q] magnitude quantiles per task:
intra ``b_k = exp(K * minmax(|tau_k|)^2)``, inter ``c_k = tanh(tau_k * sum_j tau_j)``,
score ``s_k = b_k c_k``; keep the top ``ratio`` fraction of each s_k (others -> 0) and
``theta = theta_0 + lam * sum_k s~_k tau_k / sum_k s~_k`` with s~ the min-max normalised kept scores.
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class PCBConfig(Checked):
    ratio: float = knob(0.1, gt=0, le=1, doc="fraction of entries kept per task (the paper's r)")
    clip: float = knob(1e-4, ge=0, le=1, doc="outlier clipping quantile on |tau|")
    lam: float = knob(1.0, doc="final scale on the merged task vector")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _quantile_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp each row of x (K, n) between its low and (1-high) order statistics."""
    n = x.shape[-1]
    s = x.sort(-1).values
    lo = s[:, min(n - 1, int(n * low))].unsqueeze(1)
    hi = s[:, max(0, int(n * (1 - high)) - 1)].unsqueeze(1)
    return torch.maximum(torch.minimum(x, hi), lo)


@register_merge("pcb", paper="https://arxiv.org/abs/2410.02396", config=PCBConfig)
def pcb(x: torch.Tensor, base: torch.Tensor, cfg: PCBConfig, ctx: MergeContext) -> torch.Tensor:
    k = x.shape[0]
    tau = x.reshape(k, -1)  # (K, n)
    if tau.shape[1] == 0:
        return base.clone()
    mag = _quantile_clamp(tau.abs(), cfg.clip, cfg.clip)
    clipped = tau.sign() * mag
    intra = torch.exp(k * _minmax(mag) ** 2)
    inter = torch.tanh(tau * tau.sum(0, keepdim=True))
    score = intra * inter
    # drop: everything below the (1 - ratio) quantile becomes that value, then min-max -> 0
    score = _minmax(_quantile_clamp(score, 1 - cfg.ratio, 0.0))
    merged = (clipped * score).sum(0) / score.sum(0).clamp_min(1e-12)
    return base + cfg.lam * merged.reshape(base.shape)
