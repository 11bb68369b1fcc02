"""OFT: Orthogonal Finetuning (Qiu et al., 2023) https://arxiv.org/abs/2306.07280

    R = blockdiag(R_1..R_r),  R_i = (I + S_i)(I - S_i)^{-1}  (Cayley),  S_i = -S_i^T
    W' = W R^T   (torch (out, in) layout: R rotates the input space of every neuron,
                  the paper's W' = R W0 with W0: (d_in, d_out); as peft and the official code)

Conv2d filters are rotated as flattened ``(in * kh * kw)`` vectors, as in peft.
Only the strict upper triangle of each ``S_i`` is a parameter:
``oft_S: (r, b (b - 1) / 2)`` with ``b = in_features / r``; zero init gives
``R = I`` (starts equal to the base). COFT (``coft=True``) keeps each block near the
identity, ``||S_i||_F <= eps / sqrt(r)`` (the official projection radius); we apply
the projection as a differentiable rescaling in the forward instead of rewriting the
parameter in place, so training, merging and saving never mutate state silently.
``cayley="neumann"`` replaces the exact solve by peft's default truncated Neumann
series ``I + 2 S + 2 S^2 + ... + 2 S^(m-1) + S^m`` (:func:`cayley_neumann`): cheaper,
only near-orthogonal, and what a peft OFT adapter computes unless it sets
``use_cayley_neumann=False``.

>>> import torch, deltakit as dk
>>> from deltakit.methods.oft import OFTConfig
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(m, OFTConfig(block_size=4, targets=["0"]))
>>> [tuple(p.shape) for p in ad.parameters()]     # r = 2 blocks of 4x4: 6 free entries each
[(2, 6)]
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._base_ops import Conv1D
from ._layout import from_out_in, to_out_in

__all__ = ["OFTConfig", "OFT", "cayley", "cayley_neumann", "skew"]


@dataclass(frozen=True)
class OFTConfig(DeltaConfig):
    """OFT hyper-parameters (set exactly one of ``r`` and ``block_size``)."""

    r: int = knob(0, ge=0, doc="number of diagonal blocks (0 = derive from ``block_size``)")
    block_size: int = knob(
        32, ge=0, doc="size ``b`` of each block (0 = derive from ``r``); ``in_features`` must be divisible by"
                      " it")
    coft: bool = knob(False, doc="constrained OFT: bound each block's generator by ``eps / sqrt(r)``")
    eps: float = knob(6e-5, gt=0, log=True, doc="COFT radius")
    cayley: Literal["exact", "neumann"] = knob(
        "exact", doc="``exact``: R = (I + S)(I - S)^-1 by a linear solve; ``neumann``: peft's default truncated "
                     "Neumann series of the same (cheaper, approximately orthogonal)")
    neumann_terms: int = knob(5, ge=1, doc="number of Neumann terms with ``cayley='neumann'`` (peft's "
                                           "``num_cayley_neumann_terms``)")

    def validate(self) -> None:
        if (self.r > 0) == (self.block_size > 0):
            raise ConfigError(f"OFTConfig: expected exactly one of r, block_size positive, found "
                              f"r={self.r!r}, block_size={self.block_size!r}")


def skew(params: Tensor, b: int) -> Tensor:
    """Skew-symmetric blocks from their strict upper triangles; (r, b(b-1)/2) -> (r, b, b)."""
    rows, cols = torch.triu_indices(b, b, 1, device=params.device)
    s = params.new_zeros(params.shape[0], b, b)
    s[:, rows, cols] = params
    return s - s.transpose(1, 2)


def cayley(s: Tensor) -> Tensor:
    """``(I + S)(I - S)^{-1}`` per block; orthogonal for skew-symmetric S (exact solve)."""
    eye = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s)
    return torch.linalg.solve(eye - s, eye + s, left=False)


def cayley_neumann(s: Tensor, terms: int) -> Tensor:
    """peft's truncated series for ``(I + S)(I - S)^{-1} = I + 2 S + 2 S^2 + ...``:
    ``I`` (1 term), ``I + 2 S`` (2), else ``I + 2 (S + ... + S^(m-1)) + S^m`` with
    ``m = max(3, terms - 1)`` (peft's ``_cayley_batch``, term for term)."""
    eye = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s)
    if terms == 1:
        return eye.clone()
    r, power = eye + 2 * s, s
    if terms == 2:
        return r
    for _ in range(2, max(3, terms - 1)):
        power = power @ s
        r = r + 2 * power
    return r + power @ s


@register_method("oft", OFTConfig, paper="https://arxiv.org/abs/2306.07280",
                 description="block-diagonal orthogonal rotation of the input space, Cayley-parameterised")
class OFT(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d)
    weight_dependent = True

    @classmethod
    def contract_config(cls, kind: str) -> OFTConfig | None:
        if kind == "conv":  # flattened filter sizes 3*3*3 = 27 and 8*3*3 = 72
            return OFTConfig(block_size=9, targets=["conv1", "conv2"])
        return OFTConfig(block_size=4)

    def __init__(self, base: nn.Module, config: OFTConfig, ctx: BuildContext):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"oft: grouped Conv2d is not supported (target {ctx.name!r}, groups={base.groups})")
        self.conv1d = isinstance(base, Conv1D)
        fan_in = to_out_in(base.weight, self.conv1d).shape[1]   # Conv2d: in * kh * kw (each filter flattened)
        b = config.block_size or (fan_in // config.r if fan_in % config.r == 0 else 0)
        if b == 0 or fan_in % b:
            what = f"block_size={config.block_size}" if config.block_size else f"r={config.r}"
            raise ConfigError(f"oft: target {ctx.name!r} has in_features={fan_in}, expected a multiple of "
                              f"the block size ({what})")
        self.r, self.b = fan_in // b, b
        self.coft, self.eps = config.coft, config.eps
        self.neumann_terms = config.neumann_terms if config.cayley == "neumann" else 0
        self.oft_S = nn.Parameter(torch.zeros(self.r, b * (b - 1) // 2, device=base.weight.device,
                                              dtype=param_dtype(base, config.adapter_dtype)))

    def rotation(self) -> Tensor:
        """The blocks R_i: (r, b, b)."""
        s = skew(self.oft_S.float(), self.b)
        if self.coft:
            radius = self.eps / self.r ** 0.5
            norm = s.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
            s = s * torch.clamp(radius / norm, max=1.0)
        return cayley_neumann(s, self.neumann_terms) if self.neumann_terms else cayley(s)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        w0 = base["weight"].float()
        w = to_out_in(w0, self.conv1d)                                            # (out, in_flat)
        out, fin = w.shape
        rot = self.rotation()
        # (W R^T)[o, block n] = W[o, block n] @ R_n^T
        w_new = torch.einsum("onb,ncb->onc", w.reshape(out, self.r, self.b), rot).reshape(out, fin)
        return {"weight": from_out_in(w_new, self.conv1d, tuple(w0.shape)) - w0}

    def extra_repr(self) -> str:
        series = f", neumann_terms={self.neumann_terms}" if self.neumann_terms else ""
        return f"r={self.r}, block_size={self.b}, coft={self.coft}{series}"
