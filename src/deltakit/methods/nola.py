"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani et al., 2024)
https://arxiv.org/abs/2310.02556

    A = sum_i alpha_i A_i,  B = sum_j beta_j B_j,  dW = s * B @ A,   s = lora_alpha / r
    A_i: (r, in), i < k;  B_j: (out, r), j < l  (frozen random bases);  alpha: (k,), beta: (l,) trained

Only the ``k + l`` coefficients of each target are trained and saved: the count does
not depend on the rank ``r`` nor on the layer's width. The bases are regenerated
from ``config.seed`` and the target's path (so every layer has its own bases, as in
the paper) and kept as non-persistent buffers: they are NOT in the adapter file.
With ``basis_in_memory=False`` no basis is kept at all: forward and backward
regenerate them in chunks (the paper's on-the-fly generation; same numbers, more
compute), so memory holds only ``r * (in + out)`` per target.
``beta`` starts at zero, so the model starts equal to the base (as the paper);
``alpha`` starts uniform in ``(-1/sqrt(k), 1/sqrt(k))`` (our choice: it only has to be
non-zero for beta to receive a gradient). Each basis matrix is kaiming-uniform, like
LoRA's A, drawn from its own derived seed.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(m, dk.get_method("nola").config(r=4, num_basis_A=16, num_basis_B=8, targets=["0"]))
>>> ad.num_parameters()  # k + l
24
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import DeltaConfig, register_method
from ..core.seeding import derive_seed, generator
from ._banks import FactoredDelta, layout, linear_shape, seeded_kaiming, seeded_uniform
from ._base_ops import Conv1D

__all__ = ["NolaConfig", "NOLA"]


@dataclass(frozen=True)
class NolaConfig(DeltaConfig):
    """NOLA hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="rank of the reconstructed A (r, in) and B (out, r)")
    num_basis_A: int = knob(
        1024, ge=1, log=True, doc="number ``k`` of random basis matrices (and coefficients) for A")
    num_basis_B: int = knob(
        1024, ge=1, log=True, doc="number ``l`` of random basis matrices (and coefficients) for B")
    lora_alpha: float = knob(
        16.0, gt=0, log=True, doc="scale numerator; dW is multiplied by ``lora_alpha / r`` as in LoRA")
    seed: int = knob(0, doc="seed that, with each target's path, regenerates the bases (not saved)")
    basis_in_memory: bool = knob(
        True, doc="keep the bases as buffers (fast) or regenerate them in every forward / backward pass (``k "
                  "* r * in + l * out * r`` fewer floats per target)")


_CHUNK = 64  # bases regenerated at once in on-the-fly mode


def _bases(seed: int, shape: tuple[int, int], start: int, stop: int) -> Tensor:
    """Bases ``start .. stop-1`` of one family, each from its own derived seed (so any
    chunking gives the same matrices): (stop - start, *shape), kaiming-uniform."""
    return torch.stack([seeded_kaiming(shape, generator(seed, i, scheme="joined")) for i in range(start, stop)])


class _OnTheFly(torch.autograd.Function):
    """``sum_i c_i M_i`` with the bases ``M_i`` regenerated in chunks in forward and backward
    instead of saved (memory: one chunk)."""

    @staticmethod
    def forward(ctx, coeff: Tensor, seed: int, shape: tuple[int, int]) -> Tensor:
        out = coeff.new_zeros(shape)
        for s in range(0, coeff.shape[0], _CHUNK):
            e = min(s + _CHUNK, coeff.shape[0])
            out += torch.einsum("c,cij->ij", coeff[s:e], _bases(seed, shape, s, e).to(coeff))
        ctx.save_for_backward(coeff)
        ctx.seed, ctx.shape = seed, shape
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (coeff,) = ctx.saved_tensors
        g = torch.empty_like(coeff)
        for s in range(0, coeff.shape[0], _CHUNK):
            e = min(s + _CHUNK, coeff.shape[0])
            g[s:e] = torch.einsum("cij,ij->c", _bases(ctx.seed, ctx.shape, s, e).to(grad), grad)
        return g, None, None


@register_method("nola", NolaConfig, paper="https://arxiv.org/abs/2310.02556",
                 description="A, B as trained linear combinations of seeded random basis matrices")
class NOLA(FactoredDelta):
    supported = (nn.Linear, Conv1D)

    def __init__(self, base: nn.Module, config: NolaConfig, ctx: BuildContext):
        super().__init__()
        fan_in, fan_out = linear_shape(base, "NOLA")
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        k, l, r = config.num_basis_A, config.num_basis_B, config.r
        self.layout = layout(base)
        self.scale = config.lora_alpha / r
        # Per-target bases from (seed, path): stable across runs and target orderings.
        # scheme "joined": NOLA's derivation as first released (saved adapters depend on it)
        seed = derive_seed(config.seed, ctx.name, scheme="joined")
        self.spec_A = (derive_seed(seed, "A", scheme="joined"), (r, fan_in))   # each A_i drawn like LoRA's A
        self.spec_B = (derive_seed(seed, "B", scheme="joined"), (fan_out, r))
        self.in_memory = config.basis_in_memory
        if self.in_memory:
            self.register_buffer("basis_A", _bases(*self.spec_A, 0, k).to(dev, dtype), persistent=False)
            self.register_buffer("basis_B", _bases(*self.spec_B, 0, l).to(dev, dtype), persistent=False)
        self.nola_alpha = nn.Parameter(seeded_uniform((k,), 1.0 / math.sqrt(k), generator(seed + 2, scheme="raw")).to(dev, dtype))
        self.nola_beta = nn.Parameter(torch.zeros(l, device=dev, dtype=dtype))

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """``(A, B)``: A (r, in) = sum_i alpha_i A_i, B (out, r) = sum_j beta_j B_j."""
        if self.in_memory:
            A = torch.einsum("k,kri->ri", self.nola_alpha, self.basis_A)
            B = torch.einsum("l,lor->or", self.nola_beta, self.basis_B)
            return A, B
        return (_OnTheFly.apply(self.nola_alpha, *self.spec_A), _OnTheFly.apply(self.nola_beta, *self.spec_B))

    @classmethod
    def contract_config(cls, kind: str) -> NolaConfig | None:
        return None if kind == "conv" else NolaConfig(r=4, num_basis_A=8, num_basis_B=8)
