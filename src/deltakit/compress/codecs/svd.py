"""Low-rank SVD: keep the top ``r`` singular triplets of ``dW`` as LoRA-style factors.

``dW`` (out, *rest) is the matrix M (out, in = prod(rest)), as :class:`~deltakit.taskvec.LowRank`
reads it. With ``M = U diag(S) Vh`` (S descending) the value stores

    B = U_r diag(sqrt(S_r / S_1)),   A = diag(sqrt(S_r / S_1)) Vh_r,   scale = S_1

so ``scale * B @ A`` is the rank-``r`` truncation and every factor entry is at most 1 in
magnitude: fp16 factors keep their relative precision whatever the size of the delta (a
fine-tuning delta's entries are often 1e-4 or smaller, near fp16's subnormals).

The rank is given directly (``rank``), or chosen as the smallest whose retained energy
``sum_{i<=r} S_i^2 / |M|_F^2`` reaches ``energy`` (within 1e-6 relative: the SVD's fp32
rounding), or as the largest that fits ``bits`` per
parameter: ``r = floor(bits * out * in / ((out + in) * factor_bits))``. None of the three
given means rank 16.

SVD: exact (``torch.linalg.svd``) or randomized (Halko, Martinsson & Tropp 2011, "Finding
structure with randomness", Alg. 4.4 + 5.1: a seeded Gaussian sketch with ``oversample``
extra columns and ``power_iters`` QR-stabilised power iterations). With ``energy`` the
randomized sketch doubles its rank until the sketched energy (a lower bound of the true
top-k energy) reaches the target, so the rank chosen is never below the exact one.

Error (exact SVD, Eckart-Young): ``|M - M_r|_F^2 = sum_{i>r} S_i^2``, plus the factor
rounding (fp16: about 2^-11 relative per factor entry). Randomized: the Halko et al. bound
in expectation, close to the exact error on matrices whose spectrum decays.

1-D deltas (biases, norms) have no low-rank structure: they are stored dense, as the
exact rank-1 factorisation ``B = dW[:, None]`` (in ``factor_dtype``), ``A = [[1]]``.
A :class:`~deltakit.taskvec.LowRank` input (a LoRA) is re-factored exactly first (QR of
``B`` and ``A^T``, then the SVD of the small r x r core), so truncating a LoRA is cheap.

>>> dw = torch.outer(torch.arange(1., 5.), torch.ones(3))          # rank 1
>>> v = svd(dw, SvdConfig(rank=1, factor_dtype="float32"))
>>> (v.rank, torch.allclose(v.to_dense(), dw))
(1, True)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import weakref

import torch

from ...core.fields import Checked, ConfigError, knob
from ...taskvec import LowRank, register_codec
from .._dtypes import dtype_name, dtype_of
from .._registry import CompressedValue, register_compressor

__all__ = ["SvdMethod", "SvdKnobs", "SvdConfig", "Factored", "svd", "randomized_svd", "spectrum", "matrix_of",
           "choose_rank", "energy_rank", "DEFAULT_RANK"]

DEFAULT_RANK = 16


@register_codec("svd")
@dataclass(frozen=True, eq=False)
class Factored(LowRank, CompressedValue):
    """A :class:`LowRank` whose factors may be stored narrower (fp16) than the delta they
    decode to: ``to_dense()`` returns ``orig_dtype``. Sums with other LowRank values stay
    factored (LowRank's own ``added``)."""

    orig_dtype: torch.dtype = torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return self.orig_dtype

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return LowRank.to_dense(self, dtype or self.orig_dtype)

    dense = to_dense

    def meta(self) -> dict[str, Any]:
        return {**LowRank.meta(self), "dtype": dtype_name(self.orig_dtype)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Factored:
        return cls(tensors["B"], tensors["A"], float(meta["scale"]), tuple(meta["shape"]), dtype_of(meta["dtype"]))

    def scaled(self, c: float) -> Factored:
        return Factored(self.B, self.A, self.scale * float(c), self.shape, self.orig_dtype)

    def added(self, other: Any) -> Any:
        # LowRank.added folds the scale into B in B's dtype: in fp16 that rounds the sum
        work = torch.float64 if torch.float64 in (self.orig_dtype, other.dtype) else torch.float32
        return LowRank(self.B.to(work), self.A.to(work), self.scale, self.shape).added(other)


@dataclass(frozen=True)
class SvdMethod(Checked):
    """How the singular triplets are computed (shared by every SVD-based compressor)."""

    method: Literal["exact", "randomized"] = knob("exact", doc="torch.linalg.svd, or a seeded randomized range finder")
    oversample: int = knob(8, ge=0, doc="randomized: extra sketch columns beyond the rank")
    power_iters: int = knob(2, ge=0, doc="randomized: power iterations (sharpen a slowly decaying spectrum)")
    seed: int = knob(0, ge=0, doc="randomized: seed of the Gaussian sketch")


@dataclass(frozen=True)
class SvdKnobs(SvdMethod):
    """How the rank is chosen: directly, by retained energy or by a bits/param target."""

    rank: int | None = knob(None, ge=0, log=True, doc=f"rank kept (none of rank/energy/bits: {DEFAULT_RANK})")
    energy: float | None = knob(None, gt=0, le=1, doc="smallest rank keeping this fraction of sum sigma^2")
    bits: float | None = knob(None, gt=0, log=True, doc="target bits per parameter: the largest rank that fits")

    def validate(self) -> None:
        given = [n for n in ("rank", "energy", "bits") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"{type(self).__name__}: expected at most one of rank / energy / bits, found {given}")


@dataclass(frozen=True)
class SvdConfig(SvdKnobs):
    factor_dtype: Literal["float16", "bfloat16", "float32"] = knob("float16", doc="dtype of the stored B and A")


# ----------------------------------------------------------------------------- the maths
def matrix_of(dw: torch.Tensor) -> torch.Tensor:
    """``dw`` (out, *rest) as the work-dtype matrix (out, prod(rest)); a 1-D dw is (n, 1)."""
    if dw.dim() == 0:
        raise ValueError("expected a delta with at least 1 dimension, found a 0-d tensor")
    work = torch.float64 if dw.dtype == torch.float64 else torch.float32
    return dw.reshape(dw.shape[0], -1).to(work)


def randomized_svd(mat: torch.Tensor, k: int, oversample: int, power_iters: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` (U, S, Vh) of ``mat`` (m, n) by a seeded range finder (Halko et al. Alg. 4.4/5.1)."""
    m, n = mat.shape
    width = min(k + oversample, m, n)
    g = torch.Generator(device=mat.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=g, dtype=mat.dtype, device=mat.device)  # (n, k+p)
    q = torch.linalg.qr(mat @ omega).Q                                              # (m, k+p)
    for _ in range(power_iters):  # QR between products: plain powers lose the small directions in rounding
        q = torch.linalg.qr(mat.T @ q).Q
        q = torch.linalg.qr(mat @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ mat, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def energy_rank(s: torch.Tensor, total: float, energy: float) -> int:
    """Smallest r with ``sum_{i<r} s_i^2 >= energy * total`` (``len(s)`` if none reaches it)."""
    if total <= 0:
        return 0
    cum = torch.cumsum(s.double() ** 2, 0) / total
    hit = torch.nonzero(cum >= energy * (1 - 1e-6))  # met within the fp32 SVD's rounding
    return int(hit[0]) + 1 if hit.numel() else s.numel()


def _factored_svd(lr: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD of ``scale * B @ A`` without forming it: QR of both factors, SVD of the r x r core."""
    work = torch.float64 if torch.float64 in (lr.B.dtype, lr.A.dtype) else torch.float32
    qb, rb = torch.linalg.qr(lr.B.to(work))
    qa, ra = torch.linalg.qr(lr.A.to(work).T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T * lr.scale)
    return qb @ uc, s, vch @ qa.T


def spectrum(x: torch.Tensor | LowRank, cfg: SvdMethod, rank: int | None, energy: float | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets (U (out, k), S (k,), Vh (k, in)) of ``x`` as a matrix: the first
    ``rank`` of them, or as many as ``energy`` needs (exactly one of the two is given)."""
    if isinstance(x, LowRank):
        u, s, vh = _factored_svd(x)
        total = float(s.double().pow(2).sum())
    else:
        mat = matrix_of(x)
        total = float(mat.double().pow(2).sum())
        full = min(mat.shape)
        if cfg.method == "exact" or (rank is not None and rank >= full):
            u, s, vh = _exact_svd(x, mat)
        elif rank is not None:
            u, s, vh = randomized_svd(mat, rank, cfg.oversample, cfg.power_iters, cfg.seed)
        else:
            u, s, vh = _randomized_to_energy(mat, cfg, energy, total)
    k = min(rank, s.numel()) if rank is not None else energy_rank(s, total, energy)
    return u[:, :k], s[:k], vh[:k]


_LAST_SVD: list = []  # [(weakref to the input, its version, (U, S, Vh))]: one entry


def _exact_svd(x: torch.Tensor, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(mat)``, remembered for the last input tensor: a size budget encodes
    one tensor with many SVD settings in a row (ranks, bits, code widths), and the exact SVD is
    the same for all of them. The entry is keyed by the tensor object and its version counter,
    so an in-place change or a new tensor recomputes; it holds one tensor's factors at most."""
    if _LAST_SVD:
        ref, version, usv = _LAST_SVD[0]
        if ref() is x and x._version == version and usv[0].dtype == mat.dtype:
            return usv
    usv = torch.linalg.svd(mat, full_matrices=False)
    _LAST_SVD[:] = [(weakref.ref(x), x._version, usv)]
    return usv


def _randomized_to_energy(mat: torch.Tensor, cfg: SvdMethod, energy: float, total: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k, full = 16, min(mat.shape)
    while k < full:
        u, s, vh = randomized_svd(mat, k, cfg.oversample, cfg.power_iters, cfg.seed)
        if energy_rank(s, total, energy) < s.numel() or float(s.double().pow(2).sum()) >= energy * total:
            return u, s, vh
        k *= 2
    return torch.linalg.svd(mat, full_matrices=False)


def _dims(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1


def choose_rank(cfg: SvdKnobs, shape: tuple[int, ...], bits_per_rank: float) -> int | None:
    """The rank ``cfg`` asks for on a delta of ``shape`` when it is known without the spectrum
    (``rank``, ``bits`` with one rank component costing ``bits_per_rank`` bits); None for ``energy``."""
    out, inn = _dims(shape)
    if cfg.energy is not None:
        return None
    if cfg.bits is not None:
        r = int(math.floor(cfg.bits * out * inn / bits_per_rank + 1e-9))
    else:
        r = DEFAULT_RANK if cfg.rank is None else cfg.rank
    return min(r, out, inn)


# ----------------------------------------------------------------------------- the compressor
def _rank_bits(cfg: SvdConfig, shape: tuple[int, ...]) -> float:
    out, inn = _dims(shape)
    return (out + inn) * dtype_of(cfg.factor_dtype).itemsize * 8


def _bits(cfg: SvdConfig, shape: tuple[int, ...]) -> float | None:
    """Bits per parameter, or None when it depends on the spectrum (``energy``)."""
    if len(shape) == 1:
        return (shape[0] + 1) * dtype_of(cfg.factor_dtype).itemsize * 8 / shape[0]
    r = choose_rank(cfg, shape, _rank_bits(cfg, shape))
    return None if r is None else r * _rank_bits(cfg, shape) / math.prod(shape)


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, scale)`` with ``scale * B @ A = U diag(S) Vh`` and |entries| <= 1 (see module doc)."""
    top = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
    root = (s / top).sqrt()
    return u * root, root[:, None] * vh, top


@register_compressor("svd", config=SvdConfig, paper="Eckart-Young truncation; Halko et al. 2011 (randomized)",
                     bits=_bits)
def svd(dw: torch.Tensor | LowRank, cfg: SvdConfig) -> Factored:
    """truncated SVD as LoRA factors (B, A) in fp16; rank direct, by energy or by bits/param"""
    fdt = dtype_of(cfg.factor_dtype)
    shape = tuple(dw.shape)
    if len(shape) == 1:
        return Factored(dw.detach().reshape(-1, 1).to(fdt).clone(), torch.ones(1, 1, dtype=fdt), 1.0, shape,
                        dw.dtype)
    u, s, vh = spectrum(dw, cfg, choose_rank(cfg, shape, _rank_bits(cfg, shape)), cfg.energy)
    b, a, top = balanced_factors(u, s, vh)
    return Factored(b.to(fdt).contiguous(), a.to(fdt).contiguous(), top, shape, dw.dtype)
