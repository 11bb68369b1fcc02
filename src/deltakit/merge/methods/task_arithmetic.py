"""Task arithmetic (Ilharco et al., 2023) https://arxiv.org/abs/2212.04089

``theta = theta_0 + lam * sum_k w_k tau_k``; shapes: tau (K, *shape) -> (*shape).
"""
from dataclasses import dataclass

from .._parts import GTAConfig, gta_linear_form, gta_merge
from .._registry import register_merge


@dataclass(frozen=True)
class TaskArithmeticConfig(GTAConfig):
    """Plain weighted sum of task vectors (no sparsification, no consensus)."""


register_merge("task_arithmetic", paper="https://arxiv.org/abs/2212.04089", config=TaskArithmeticConfig,
               linear_form=gta_linear_form)(gta_merge)
