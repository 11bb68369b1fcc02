"""DARE: drop and rescale (Yu et al., 2024) https://arxiv.org/abs/2311.03099 and
DAREx-q (Deng et al., 2025) https://arxiv.org/abs/2410.09344

DARE: ``tau_k <- m_k * tau_k / (1 - p)``, m_k ~ Bernoulli(1 - p) elementwise (density = 1 - p),
then task arithmetic (``dare_linear``) or TIES sign election (``dare_ties``).
DAREx-q replaces the 1 / (1 - p) rescale by a tuned 1 / q (``rescale="q"``).
mergekit rescales by matching the L1 norm instead (``rescale="l1"``; its recipes map to that).
"""
from dataclasses import dataclass
from typing import Literal

from ...core.fields import knob
from .._parts import GTAConfig, gta_linear_form, gta_merge
from .._registry import register_merge

_Sp = Literal["none", "magnitude", "magnitude_sort", "random", "breadcrumbs", "della"]
_Rs = Literal["none", "inverse", "q", "l1", "l2", "linf"]
_Cs = Literal["none", "sum", "count"]


@dataclass(frozen=True)
class DareLinearConfig(GTAConfig):
    density: float | tuple[float, ...] = 0.1  # p = 0.9, the paper's usual drop rate
    sparsify: _Sp = "random"
    rescale: _Rs = "inverse"


@dataclass(frozen=True)
class DareTiesConfig(DareLinearConfig):
    consensus: _Cs = "sum"


@dataclass(frozen=True)
class DarexQConfig(DareLinearConfig):
    rescale: _Rs = "q"
    q: float | None = knob(0.2, gt=0, doc="kept entries are rescaled by 1/q (one value: not per model here)")


register_merge("dare_linear", paper="https://arxiv.org/abs/2311.03099", config=DareLinearConfig,
               linear_form=gta_linear_form)(gta_merge)
register_merge("dare_ties", paper="https://arxiv.org/abs/2311.03099", config=DareTiesConfig,
               linear_form=gta_linear_form)(gta_merge)
register_merge("darex_q", paper="https://arxiv.org/abs/2410.09344", config=DarexQConfig,
               linear_form=gta_linear_form)(gta_merge)
