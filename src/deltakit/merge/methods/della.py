"""DELLA-Merging (Deep et al., 2024) https://arxiv.org/abs/2406.11617

MagPrune: keep probability grows linearly with magnitude rank in
[density - epsilon, density + epsilon], rescale, then TIES election (``della``) or sum.
"""
from dataclasses import dataclass
from typing import Literal

from .._parts import GTAConfig, gta_linear_form, gta_merge
from .._registry import register_merge


@dataclass(frozen=True)
class DellaLinearConfig(GTAConfig):
    density: float | tuple[float, ...] = 0.5
    sparsify: Literal["none", "magnitude", "magnitude_sort", "random", "breadcrumbs", "della"] = "della"
    rescale: Literal["none", "inverse", "q", "l1", "l2", "linf"] = "l1"


@dataclass(frozen=True)
class DellaConfig(DellaLinearConfig):
    consensus: Literal["none", "sum", "count"] = "sum"
    normalize: bool = True


register_merge("della_linear", paper="https://arxiv.org/abs/2406.11617", config=DellaLinearConfig,
               linear_form=gta_linear_form)(gta_merge)
register_merge("della", paper="https://arxiv.org/abs/2406.11617", config=DellaConfig,
               linear_form=gta_linear_form)(gta_merge)
