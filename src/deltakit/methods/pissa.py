"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng et al., 2024)
https://arxiv.org/abs/2404.02948

    W = U S V^T,  A0 = sqrt(S_r / s) V_r^T,  B0 = U_r sqrt(S_r / s)   (so s B0 A0 = U_r S_r V_r^T)
    W' = W + s (B A - B0 A0),   A, B trained from A0, B0

The paper replaces the base by the residual ``W - s B0 A0`` and trains LoRA factors
initialised from the principal part. deltakit never changes the base, so the delta
carries the frozen offset ``- s B0 A0`` instead: the adapted model starts exactly
equal to the base, and ``W + dW`` equals the paper's ``W_res + s B A`` at every step
(dropout, if any, acts on the trained branch only, as in the paper).

The offset factors (A0, B0) are buffers. ``offset="recompute"`` (default) does not
store them: they are re-derived at load by the same SVD of the base, which the
adapter manifest's base fingerprint pins (so the file is as small as LoRA's); on
the same torch/LAPACK the SVD is bit-identical, across builds it may differ in the
last bits. ``offset="store"`` writes them to the file (twice the
size) for loading into a base whose fingerprint differs, or when exact cross-platform
reproduction matters. Shapes as LoRA: A (r, in), B (out, r); Conv2d A (r, in, kh, kw),
B (out, r, 1, 1) from the SVD of the (out, in*kh*kw) matrix.

>>> import torch, deltakit as dk
>>> lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(lin, dk.get_method("pissa").config(r=2, targets=["0"]))
>>> ad.num_parameters(trainable_only=True)   # r * (in + out)
24
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.registry import ConfigError, register_method
from ..core.seeding import generator
from ._base_ops import Conv1D
from .lora import LoRA, LoraConfig, _dense, _down, _up

__all__ = ["PissaConfig", "PiSSA"]


@dataclass(frozen=True)
class PissaConfig(LoraConfig):
    """PiSSA hyper-parameters: LoRA's (``r``, ``alpha``, ``dropout``, ``use_rslora``) plus the fields below."""

    method: ClassVar[str] = ""

    init: Literal["pissa"] = knob("pissa", doc="always ``\"pissa\"`` (A, B from the top-r singular triplets of W)")
    offset: Literal["recompute", "store"] = knob(
        "recompute", doc="``\"recompute\"`` re-derives the frozen offset ``B0 A0`` from the base at load (not "
                         "stored); ``\"store\"`` saves it in the adapter file")
    svd_niter: int | None = knob(
        None, ge=0, doc="None = exact SVD; N = randomized SVD with N subspace iterations "
                        "(``torch.svd_lowrank`` from a fixed seed, peft's ``pissa_niter_N``): much faster on "
                        "large weights, and still reproducible at load")


def _top_svd(mat: Tensor, r: int, niter: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """``U (out, >=r), S (>=r,), Vh (>=r, in)`` of ``mat``, exact or randomized."""
    if niter is None:
        return torch.linalg.svd(mat, full_matrices=False)
    return _svd_lowrank(mat, r, niter)


def _svd_lowrank(A: Tensor, q: int, niter: int) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.svd_lowrank(A, q, niter)`` (Halko et al. 2009, alg. 4.4 + 5.1) as torch 2.x
    computes it after ``torch.manual_seed(0)``, but with its own generator.

    The offset re-derived at load must be the one the adapter was trained against, so
    the test matrix is seeded; torch draws it from the global RNG, which other threads
    share and a fork/seed/restore would clobber. Same numbers as the release that called
    ``torch.manual_seed(0); torch.svd_lowrank(...)`` (tests/data/adapters/pissa_lowrank).
    Returns ``U (m, q), S (q,), Vh (q, n)``.
    """
    m, n = A.shape
    tall = A if m >= n else A.mH
    R = torch.randn(tall.shape[-1], q, dtype=tall.dtype, device=tall.device,
                    generator=generator(0, scheme="raw", device=tall.device))
    Q = torch.linalg.qr(tall @ R).Q
    for _ in range(niter):
        Q = torch.linalg.qr(tall.mH @ Q).Q
        Q = torch.linalg.qr(tall @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ tall, full_matrices=False)
    U = Q @ U
    return (U, S, Vh) if m >= n else (Vh.mH, S, U.mH.contiguous())


@register_method("pissa", PissaConfig, paper="https://arxiv.org/abs/2404.02948",
                 description="LoRA initialised from W's principal singular triplets, minus that frozen offset")
class PiSSA(LoRA):
    supported = (nn.Linear, Conv1D, nn.Conv2d)
    # dW includes the offset -s B0 A0, a function of the base values it was built on
    weight_dependent = True
    # LoRA's batched path would ignore the offset; rows fall back to per-adapter sub-batches.
    mixed_residual = None
    routed_residual = None

    def __init__(self, base: nn.Module, config: PissaConfig, ctx: BuildContext | None = None):
        super().__init__(base, config, ctx)
        w = base.weight.detach().float()
        mat = w.t() if self.layout == "conv1d" else w.reshape(w.shape[0], -1)   # (out, in[*kh*kw])
        if self.r > min(mat.shape):
            raise ConfigError(f"PissaConfig.r: expected at most min(out, in) = {min(mat.shape)} for "
                              f"{ctx.name if ctx else type(base).__name__}, found {self.r}")
        U, S, Vh = _top_svd(mat, self.r, config.svd_niter)
        root = (S[: self.r] / self.scale).sqrt()                  # (r,)
        A0 = (root[:, None] * Vh[: self.r]).reshape(self.lora_A.shape).to(self.lora_A.dtype)
        B0 = (U[:, : self.r] * root[None, :]).reshape(self.lora_B.shape).to(self.lora_B.dtype)
        with torch.no_grad():
            self.lora_A.copy_(A0)
            self.lora_B.copy_(B0)
        store = config.offset == "store"
        # same memory layout as lora_A / lora_B: the same matmul kernels then give the
        # bit-identical product, so dW is exactly zero at init
        self.register_buffer("offset_A", A0.contiguous().clone(), persistent=store)
        self.register_buffer("offset_B", B0.contiguous().clone(), persistent=store)

    def reset_parameters(self, init: str, embedding: bool = False) -> None:
        """No random init: the SVD in ``__init__`` sets A and B."""

    def offset(self) -> Tensor:
        """``s * B0 @ A0`` in the base weight's layout (the frozen principal part)."""
        return _dense(self.offset_A, self.offset_B, self.layout, self.scale)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"weight": self.product() - self.offset()}

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, ...]]:
        """``(B', A', s, shape)`` with ``dW = s [B, -B0] @ [A; A0]`` (rank 2r), as LoRA's."""
        B1, A1, s, shape = super().factors()
        off = SimpleNamespace(lora_A=self.offset_A, lora_B=self.offset_B, r=self.r, layout=self.layout,
                              scale=self.scale)
        B0, A0, _, _ = LoRA.factors(off)   # same layout rules applied to the offset factors
        return torch.cat([B1, -B0.to(B1.dtype)], dim=1), torch.cat([A1, A0.to(A1.dtype)], dim=0), s, shape

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        """``s B(A(dropout x)) - s B0(A0 x)`` without forming either product."""
        x0 = x if not x.is_floating_point() else x.to(self.offset_A.dtype)
        return super().residual(base, x) - _up(base, _down(base, x0, self.offset_A), self.offset_B) * self.scale
