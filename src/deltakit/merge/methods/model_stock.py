"""Model Stock (Jang et al., 2024) https://arxiv.org/abs/2403.19522

With cos(theta) the mean pairwise cosine between task vectors tau_k = theta_k - theta_0,
``t = K cos / (1 + (K - 1) cos)`` and ``theta = t * mean_k theta_k + (1 - t) theta_0``.
``filter_wise``: one t per output row instead of per tensor. Shapes: (K, *shape) -> (*shape).
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._registry import MergeConfigError, MergeContext, register_merge


@dataclass(frozen=True)
class ModelStockConfig(Checked):
    filter_wise: bool = knob(False, doc="one interpolation ratio per output row (filter) instead of per tensor")


@register_merge("model_stock", paper="https://arxiv.org/abs/2403.19522", config=ModelStockConfig)
def model_stock(x: torch.Tensor, base: torch.Tensor, cfg: ModelStockConfig, ctx: MergeContext) -> torch.Tensor:
    k = x.shape[0]
    if k < 2:
        raise MergeConfigError(f"model_stock: expected at least 2 fine-tuned models, found {k}")
    rows = x.reshape(k, x.shape[1] if cfg.filter_wise and x.dim() > 2 else 1, -1)  # (K, R, n)
    norms = torch.linalg.vector_norm(rows, dim=-1)  # (K, R)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            num = (rows[i] * rows[j]).sum(-1)
            cos.append((num / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)  # (R, 1)
    denom = 1 + (k - 1) * c
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(denom), denom))
    # t * mean(theta_k) + (1 - t) theta_0 = theta_0 + t * mean(tau_k)
    return base + (t * rows.mean(0)).reshape(base.shape)
