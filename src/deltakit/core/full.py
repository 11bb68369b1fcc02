"""Full fine-tuning of a target's parameters, stored as a full copy.

    W' = P,  P initialised to W  (so dW = P - W)

Lives in ``core`` because the core builds it for every ``modules_to_save`` target.
Used for ``modules_to_save`` (a new classification head trained in full beside a
PEFT method, as in peft) and as the full fine-tuning reference in benchmarks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from .delta import BuildContext, WeightDelta
from .registry import DeltaConfig, register_method

__all__ = ["FullConfig", "FullDelta"]


@dataclass(frozen=True)
class FullConfig(DeltaConfig):
    """Train every direct parameter of each target (no extra hyper-parameters)."""


@register_method("full", FullConfig, paper="https://arxiv.org/abs/1810.04805",
                 description="full fine-tuning of the targets (a trainable copy of each weight)")
class FullDelta(WeightDelta):
    weight_dependent = True

    def __init__(self, base: nn.Module, config: FullConfig, ctx: BuildContext | None = None):
        super().__init__()
        params = dict(base.named_parameters(recurse=False))
        if not params:
            raise ValueError(f"full fine-tuning needs a module with parameters, {type(base).__name__} has none")
        self.names = list(params)
        self.values = nn.ParameterDict({k: nn.Parameter(p.detach().clone()) for k, p in params.items()})

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.values[k].float() - base[k].float() for k in self.names}
