"""Multi-model SLERP: barycentric interpolation on the hypersphere (Goddard, 2025)
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea

With u_k = tau_k/|tau_k| (tau_k = theta_k - theta_0, or theta_k when there is no base),
m = normalize(sum_k w_k u_k), tangent v = sum_k w_k (u_k - <u_k, m> m):
``theta = theta_0 + (sum_k w_k |tau_k|) * (cos|v| m + sin|v| v/|v|)``.
Shapes: (K, *shape) -> (*shape).
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._parts import per_model
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class MultiSlerpConfig(Checked):
    weights: tuple[float, ...] | None = knob(None, per_model=True, doc="per-model weight (default 1 each)")
    normalize_weights: bool = knob(True, doc="divide the weights by their sum")
    eps: float = knob(1e-8, gt=0, log=True, doc="norms below this count as zero")


@register_merge("multislerp", paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
                config=MultiSlerpConfig)
def multislerp(x: torch.Tensor, base: torch.Tensor, cfg: MultiSlerpConfig, ctx: MergeContext) -> torch.Tensor:
    k = x.shape[0]
    if k == 1:
        return base + x[0]
    w = torch.tensor(per_model(cfg.weights, k, 1.0, "weights"), dtype=x.dtype)
    if cfg.normalize_weights:
        w = w / w.sum()
    flat = x.reshape(k, -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)  # (K, 1)
    unit = flat / (norms + cfg.eps)
    mean = (unit * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < cfg.eps:
        raise ValueError("multislerp: expected task vectors whose weighted mean direction is non-zero, "
                         "found antipodal inputs that cancel")
    mean = mean / mean_norm
    tangent = ((unit - (unit @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = torch.linalg.vector_norm(tangent) + cfg.eps
    out = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    return base + (out * (norms.squeeze(1) * w).sum()).reshape(base.shape)
