"""TIES-Merging (Yadav et al., 2023) https://arxiv.org/abs/2306.01708

Trim (keep top-density |tau_k|), elect sign ``s = sign(sum_k w_k tau_k)``, disjoint mean:
``theta = theta_0 + lam * sum_k [sign(tau_k) = s] w_k tau_k / sum_k [sign(tau_k) = s] w_k``.
Breadcrumbs-TIES and DARE-TIES are the same consensus with another sparsifier.
"""
from dataclasses import dataclass
from typing import Literal

from .._parts import GTAConfig, gta_linear_form, gta_merge
from .._registry import register_merge


@dataclass(frozen=True)
class TiesConfig(GTAConfig):
    density: float | tuple[float, ...] = 0.2  # the paper's k = 20%
    sparsify: Literal["none", "magnitude", "magnitude_sort", "random", "breadcrumbs", "della"] = "magnitude"
    consensus: Literal["none", "sum", "count"] = "sum"
    normalize: bool = True


register_merge("ties", paper="https://arxiv.org/abs/2306.01708", config=TiesConfig,
               linear_form=gta_linear_form)(gta_merge)
