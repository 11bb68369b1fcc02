"""Fisher-weighted averaging (Matena & Raffel, 2022) https://arxiv.org/abs/2111.09832

``theta = sum_k w_k F_k theta_k / sum_k w_k F_k`` elementwise, with F_k the diagonal Fisher
of model k (``ctx.stats["fisher"]`` (K, *shape); estimate with
:func:`deltakit.merge.estimate_fisher`). Where every F_k is ~0, the plain weighted mean is used.
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._parts import per_model
from .._registry import MergeContext, register_merge


@dataclass(frozen=True)
class FisherConfig(Checked):
    weights: tuple[float, ...] | None = knob(None, per_model=True, doc="per-model weight (default 1 each)")
    fisher_floor: float = knob(
        1e-6, ge=0, log=True, doc="added to each F_k, as the paper does, so no entry divides by 0")


@register_merge("fisher", paper="https://arxiv.org/abs/2111.09832", config=FisherConfig, inputs="weights",
                needs_stats=("fisher",))
def fisher(x: torch.Tensor, base: torch.Tensor, cfg: FisherConfig, ctx: MergeContext) -> torch.Tensor:
    f = ctx.stats["fisher"].to(x.dtype)
    if f.shape != x.shape:
        raise ValueError(f"fisher: expected statistic shape {tuple(x.shape)}, found {tuple(f.shape)}")
    w = torch.tensor(per_model(cfg.weights, x.shape[0], 1.0, "weights"), dtype=x.dtype)
    wf = (f + cfg.fisher_floor) * w.reshape(-1, *([1] * (x.dim() - 1)))
    return (wf * x).sum(0) / wf.sum(0)
