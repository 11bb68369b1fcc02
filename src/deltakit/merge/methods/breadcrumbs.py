"""Model Breadcrumbs (Davari & Belilovsky, 2024) https://arxiv.org/abs/2312.06795

Two-sided mask per task vector: drop the largest gamma fraction (outliers) and the
smallest entries so that a density fraction survives; then task arithmetic
(``breadcrumbs``) or TIES sign election (``breadcrumbs_ties``).
"""
from dataclasses import dataclass
from typing import Literal

from .._parts import GTAConfig, gta_linear_form, gta_merge
from .._registry import register_merge


@dataclass(frozen=True)
class BreadcrumbsConfig(GTAConfig):
    density: float | tuple[float, ...] = 0.9
    gamma: float | tuple[float, ...] = 0.01
    sparsify: Literal["none", "magnitude", "magnitude_sort", "random", "breadcrumbs", "della"] = "breadcrumbs"


@dataclass(frozen=True)
class BreadcrumbsTiesConfig(BreadcrumbsConfig):
    consensus: Literal["none", "sum", "count"] = "sum"


register_merge("breadcrumbs", paper="https://arxiv.org/abs/2312.06795", config=BreadcrumbsConfig,
               linear_form=gta_linear_form)(gta_merge)
register_merge("breadcrumbs_ties", paper="https://arxiv.org/abs/2312.06795", config=BreadcrumbsTiesConfig,
               linear_form=gta_linear_form)(gta_merge)
