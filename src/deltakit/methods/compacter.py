"""Compacter and Compacter++ (Mahabadi et al. 2021, https://arxiv.org/abs/2106.04647).

A Houlsby-style bottleneck adapter whose two projections are PHM layers built from
Kronecker products:

    h' = h + PHM_up(f(PHM_down(h))),   W = sum_{i=1..n} A_i (x) B_i,   B_i = s_i t_i^T

A_i: (n, n), one set (n, n, n) SHARED by every PHM layer of the adapter (the "slow
weights", stored once under ``deltakit_shared``); B_i: (d/n, k/n) per layer, rank
``phm_rank`` (1 in the paper). Trainable parameters without biases
(paper, section 3.4): Compacter 4L(k + d) + n^3 (adapters after attention and FFN),
Compacter++ 2L(k + d) + n^3 (after the FFN only); biases add L(k + d) per adapter
position. Initialisation: s, t glorot-uniform (the official code's default), A ~
N(0, ``phm_init_std``), biases 0 - so the adapter starts near the identity.

>>> import torch, deltakit as dk
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> cfg = dk.get_method("compacter").config(bottleneck_size=4, phm_dim=2, targets=["0"])
>>> dk.attach(net, cfg).num_parameters()   # n^3 + 2(k + d) + biases (k + d)
44
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._adapter_common import ACTIVATIONS, BranchDelta, PHMLinear, module_width
from ._base_ops import Conv1D
from .bottleneck import ATTN_OUT, FFN_OUT

__all__ = ["CompacterConfig", "CompacterPPConfig", "Compacter", "CompacterPP"]


@dataclass(frozen=True)
class CompacterConfig(DeltaConfig):
    """Compacter hyper-parameters."""

    bottleneck_size: int = knob(32, ge=1, log=True, doc="k, the adapter's hidden width (divisible by ``phm_dim``)")
    phm_dim: int = knob(4, ge=1, doc="n, number of Kronecker summands and size of each A_i")
    phm_rank: int = knob(1, ge=0, doc="rank of each B_i (1 in the paper); 0 = full B_i (PHM-Adapter)")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = knob("gelu", doc="f between the projections")
    bias: bool = knob(True, doc="biases on the PHM layers (the official code has them; the paper's count omits them)")
    phm_init_std: float = knob(0.01, ge=0, doc="std of the shared A_i at initialisation")

    def validate(self) -> None:
        name = type(self).__name__
        if self.bottleneck_size % self.phm_dim:
            raise ConfigError(f"{name}.bottleneck_size: expected a multiple of phm_dim={self.phm_dim}, "
                              f"found {self.bottleneck_size}")


@dataclass(frozen=True)
class CompacterPPConfig(CompacterConfig):
    """Compacter++: the same adapter after the FFN only (fields: :class:`CompacterConfig`)."""

    method: ClassVar[str] = ""  # its own registry entry, not the parent's


class _Shared(nn.Module):
    def __init__(self, n: int, std: float, dtype: torch.dtype, device):
        super().__init__()
        self.phm_rule = nn.Parameter(torch.randn(n, n, n, dtype=dtype, device=device) * std)  # (n, n, n) = A_i


class _PHMBranch(nn.Module):
    def __init__(self, d: int, k: int, config: CompacterConfig, A: torch.Tensor, dtype, device):
        super().__init__()
        kw = dict(rank=config.phm_rank, bias=config.bias, dtype=dtype, device=device)
        self.down = PHMLinear(d, k, config.phm_dim, A, **kw)
        self.up = PHMLinear(k, d, config.phm_dim, A, **kw)
        self.act = ACTIVATIONS[config.non_linearity]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


@register_method("compacter", CompacterConfig, paper="https://arxiv.org/abs/2106.04647",
                 description="adapters with shared-Kronecker (PHM) projections after attention and FFN")
class Compacter(BranchDelta):
    supported: ClassVar[tuple[type, ...]] = (nn.Linear, Conv1D)
    default_targets = {k: ATTN_OUT[k] + FFN_OUT[k] for k in FFN_OUT}
    _config: ClassVar[type] = CompacterConfig

    def __init__(self, base: nn.Module, config: CompacterConfig, ctx: BuildContext):
        super().__init__()
        if ctx is None or ctx.shared is None:
            raise ConfigError("Compacter needs the adapter's shared slow weights (attach it with dk.attach)")
        d = module_width(base)[1]
        self.branch_in = d
        dev = next(base.parameters()).device
        self.branch = _PHMBranch(d, config.bottleneck_size, config, ctx.shared.phm_rule,
                                 param_dtype(base, config.adapter_dtype), dev)

    @classmethod
    def build_shared(cls, config: CompacterConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        base = next(iter(targets.values()))
        return _Shared(config.phm_dim, config.phm_init_std, param_dtype(base, config.adapter_dtype),
                       next(base.parameters()).device)

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else cls._config(bottleneck_size=4, phm_dim=2)


@register_method("compacter_pp", CompacterPPConfig, paper="https://arxiv.org/abs/2106.04647",
                 description="Compacter++: the PHM adapter after the FFN only")
class CompacterPP(Compacter):
    default_targets = FFN_OUT
    _config = CompacterPPConfig
