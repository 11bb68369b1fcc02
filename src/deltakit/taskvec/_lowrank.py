"""A factored weight delta that stays factored until someone needs it dense."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._values import Delta, DeltaValue, as_dense, register_codec

__all__ = ["LowRank", "Delta", "as_dense"]


@register_codec("lowrank")
@dataclass(frozen=True, eq=False)
class LowRank(DeltaValue):
    """``dW = scale * B @ A`` (LoRA's ``lora_B @ lora_A``), reshaped to ``shape``.

    Shapes: ``B`` (out, r), ``A`` (r, in), ``dense()`` (out, in) or ``shape`` when the
    target is e.g. a conv kernel (out, in_c, kh, kw) with in = in_c*kh*kw.
    Sum of two LowRank deltas is exact and stays LowRank: the factors are
    concatenated along r, ``s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] @ [A1; A2]``.
    Stored in files as codec ``lowrank``: parts ``B`` and ``A``, meta ``scale`` and ``shape``.

    >>> d = LowRank(torch.ones(4, 1), torch.ones(1, 3), scale=0.5)
    >>> d.dense().shape
    torch.Size([4, 3])
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LowRank: expected B (out, r) and A (r, in), found B {tuple(self.B.shape)} "
                             f"and A {tuple(self.A.shape)}")
        full = (self.B.shape[0], self.A.shape[1])
        if self.shape is not None:
            numel = 1
            for s in self.shape:
                numel *= s
            if numel != full[0] * full[1] or self.shape[0] != full[0]:
                raise ValueError(f"LowRank: expected a shape with {full[0]} rows and {full[0] * full[1]} "
                                 f"elements, found {tuple(self.shape)}")
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        else:
            object.__setattr__(self, "shape", full)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.B.dtype, self.A.dtype)

    @classmethod
    def from_dense(cls, dw: torch.Tensor, rank: int) -> tuple["LowRank", float]:
        """Best rank-``rank`` approximation of ``dw`` (truncated SVD, Eckart-Young) and its
        relative Frobenius error ``|dw - approx| / |dw|``.

        dw: (out, *rest) is treated as the matrix (out, prod(rest)); the result keeps its shape.
        """
        if rank <= 0:
            raise ValueError(f"LowRank.from_dense: expected a positive rank, found {rank}")
        shape = tuple(dw.shape)
        mat = dw.reshape(shape[0], -1).to(torch.float64 if dw.dtype == torch.float64 else torch.float32)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, S.numel())
        total = S.pow(2).sum()
        err = float((S[r:].pow(2).sum() / total).sqrt()) if total > 0 else 0.0
        return cls(U[:, :r] * S[:r], Vh[:r], 1.0, shape), err

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Materialise ``scale * B @ A`` (computed in fp32 or wider, returned in ``dtype``)."""
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        out = (self.B.to(work) @ self.A.to(work)) * self.scale
        return out.reshape(self.shape).to(dtype or work)

    dense = to_dense  # the name this class had before the DeltaValue protocol

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "A": self.A}

    def meta(self) -> dict[str, Any]:
        return {"scale": self.scale, "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> LowRank:
        return cls(tensors["B"], tensors["A"], float(meta["scale"]), tuple(meta["shape"]))

    def scaled(self, c: float) -> LowRank:
        return LowRank(self.B, self.A, self.scale * float(c), self.shape)

    def added(self, other: Delta) -> Delta:
        if isinstance(other, LowRank):
            if other.shape != self.shape:
                raise ValueError(f"LowRank add: expected shape {self.shape}, found {other.shape}")
            if self.scale == other.scale:
                return LowRank(torch.cat([self.B, other.B], 1), torch.cat([self.A, other.A], 0),
                               self.scale, self.shape)
            return LowRank(torch.cat([self.B * self.scale, other.B * other.scale], 1),
                           torch.cat([self.A, other.A], 0), 1.0, self.shape)
        if isinstance(other, torch.Tensor):
            return self.dense(torch.promote_types(other.dtype, torch.float32)) + other
        return super().added(other)

    def norm(self) -> float:
        """Frobenius norm without forming B @ A: ``|sBA|^2 = s^2 tr((B^T B)(A A^T))``, O(r^2 (out+in))."""
        work = torch.float64
        g = (self.B.to(work).T @ self.B.to(work)) * (self.A.to(work) @ self.A.to(work).T)
        return float(abs(self.scale) * g.sum().clamp_min(0).sqrt())

    def __mul__(self, c: float) -> LowRank:
        return self.scaled(c)

    __rmul__ = __mul__

    def __neg__(self) -> LowRank:
        return self.scaled(-1.0)
