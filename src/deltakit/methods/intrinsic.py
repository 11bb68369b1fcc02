"""Intrinsic-dimension subspace training (Li et al., 2018, https://arxiv.org/abs/1804.08838;
Aghajanyan et al., 2020, https://arxiv.org/abs/2012.13255)

    theta_t = theta0_t + P_t z            (DID: one z for all targets)
    theta_t = theta0_t + lambda_t P_t z    (SAID: one learned scale per target)

``theta_t`` is target t's parameters flattened (weight then bias), ``D_t`` long;
``z: (d,)`` is shared by all targets and starts at 0 (model starts equal to the
base). ``P_t: (D_t, d)`` is random and fixed, regenerated from ``seed`` and the
target path - never stored: non-persistent buffers.

* ``dense``: Gaussian ``P_t`` with unit-length columns (Li et al.).
* ``fastfood``: ``P_t z = (H G Pi H B z_pad)[:D_t] / sqrt(D_t * ||G||^2)``, H the
  (unnormalised) Walsh-Hadamard transform of size ``L = 2^ceil(log2 max(D_t, d))``,
  B random signs, Pi a permutation, G Gaussian (Le et al. 2013, as in both papers):
  O(L log L) time and O(L) memory instead of O(D_t d).
* ``auto``: dense while ``D_t * d <= dense_max``, else fastfood.

Stored parameters: ``d`` (DID), or ``d`` split as ``d - m`` for z and ``m`` lambdas
(SAID, m = number of targets, the paper's accounting; lambdas start at 1).

>>> import torch, deltakit as dk
>>> from deltakit.methods.intrinsic import IntrinsicConfig
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
>>> dk.attach(m, IntrinsicConfig(d=8, targets=["0", "1"])).num_parameters()
8
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.seeding import generator
from ._base_ops import Conv1D
from ._sparse_common import ALL_LINEAR

__all__ = ["IntrinsicConfig", "Intrinsic", "fwht", "fastfood"]


@dataclass(frozen=True)
class IntrinsicConfig(DeltaConfig):
    """Intrinsic-dimension hyper-parameters."""

    d: int = knob(
        1000, ge=1, log=True, doc="the subspace dimension (total trainable parameters, SAID's lambdas "
                                  "included)")
    projection: Literal["auto", "dense", "fastfood"] = knob(
        "auto", doc="``auto``, ``dense`` (Gaussian) or ``fastfood``")
    said: bool = knob(False, doc="structure-aware variant: one learned scale per target")
    seed: int = knob(0, doc="seed of the random projections (each target mixes in its path)")
    dense_max: int = knob(2**22, ge=1, doc="``auto`` uses a dense P_t while ``D_t * d`` is at most this")


def fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim (a power of two):
    ``x @ H_n`` with ``H_n`` Sylvester's Hadamard matrix (``H_n H_n = n I``)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht: expected a power-of-two length, found {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def fastfood(z: Tensor, signs: Tensor, perm: Tensor, gauss: Tensor, out: int) -> Tensor:
    """``(H G Pi H B z_pad)[:out] / sqrt(out * ||G||^2)``; z: (d,), signs/perm/gauss: (L,)."""
    L = signs.shape[0]
    x = torch.nn.functional.pad(z, (0, L - z.shape[0])) * signs.to(z.dtype)
    x = fwht(x)[perm] * gauss
    return fwht(x)[:out] / torch.sqrt(out * gauss.pow(2).sum())


class _Subspace(nn.Module):
    """The shared trainable part: z (and SAID's lambdas), plus each target's lambda slot."""

    def __init__(self, config: IntrinsicConfig, paths: list[str], device: torch.device):
        super().__init__()
        m = len(paths)
        dz = config.d - m if config.said else config.d
        if dz <= 0:
            raise ConfigError(f"intrinsic: SAID needs d > number of targets; expected d > {m}, found d={config.d}")
        self.z = nn.Parameter(torch.zeros(dz, device=device))
        self.said_lambda = nn.Parameter(torch.ones(m, device=device)) if config.said else None
        # slots by sorted path, so they do not depend on the order targets come in
        self.slot = {p: i for i, p in enumerate(sorted(paths))}


@register_method("intrinsic", IntrinsicConfig, paper="https://arxiv.org/abs/2012.13255",
                 description="train a d-dim z shared by all targets: theta = theta0 + P z (dense/Fastfood, SAID)")
class Intrinsic(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding, nn.LayerNorm)
    default_targets = ALL_LINEAR  # the papers project into every parameter; narrow by targets

    @classmethod
    def build_shared(cls, config: IntrinsicConfig, targets: Mapping[str, nn.Module]) -> _Subspace:
        device = next(next(iter(targets.values())).parameters()).device if targets else None
        return _Subspace(config, list(targets), device)

    def __init__(self, base: nn.Module, config: IntrinsicConfig, ctx: BuildContext):
        super().__init__()
        object.__setattr__(self, "_shared", ctx.shared)  # a reference, not a submodule
        self.slot = ctx.shared.slot[ctx.name]
        self.shapes = {k: tuple(p.shape) for k, p in base.named_parameters(recurse=False)}
        D = sum(math.prod(s) for s in self.shapes.values())
        dz = ctx.shared.z.numel()
        self.kind = config.projection
        if self.kind == "auto":
            self.kind = "dense" if D * dz <= config.dense_max else "fastfood"
        device = ctx.shared.z.device
        g = generator(config.seed, ctx.name, scheme="path")
        if self.kind == "dense":
            P = torch.randn(D, dz, generator=g)
            self.register_buffer("P", (P / P.norm(dim=0, keepdim=True)).to(device), persistent=False)  # (D, d)
        else:
            L = 1 << (max(D, dz, 2) - 1).bit_length()   # next power of two >= max(D, d)
            # compact dtypes (9 bytes per entry): these live for every target of a large model
            signs = (torch.randint(0, 2, (L,), generator=g) * 2 - 1).to(torch.int8)
            perm = torch.randperm(L, generator=g).to(torch.int32 if L < 2**31 else torch.int64)
            self.register_buffer("ff_signs", signs.to(device), persistent=False)
            self.register_buffer("ff_perm", perm.to(device), persistent=False)
            self.register_buffer("ff_gauss", torch.randn(L, generator=g).to(device), persistent=False)
        self.D = D

    def flat_delta(self) -> Tensor:
        """``(lambda_t) P_t z``: (D_t,)."""
        z = self._shared.z.float()
        if self.kind == "dense":
            v = self.P @ z
        else:
            v = fastfood(z, self.ff_signs, self.ff_perm, self.ff_gauss, self.D)
        lam = self._shared.said_lambda
        return v * lam[self.slot].float() if lam is not None else v

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        flat, out, i = self.flat_delta(), {}, 0
        for k, s in self.shapes.items():
            n = math.prod(s)
            out[k] = flat[i:i + n].view(s)
            i += n
        return out

    def extra_repr(self) -> str:
        return f"D={self.D}, projection={self.kind}"
