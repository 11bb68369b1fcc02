"""Per-group round-to-nearest quantisation: of dense deltas (``quant``) and of low-rank factors
(``svd_quant``: SVD factors then quantised, or a LoRA's B and A as they are).

A matrix (rows, cols) is cut into groups of ``group_size`` consecutive entries along each
row (the input dim; a conv kernel is (out, in_c*kh*kw) as LowRank reads it, a 1-D delta
one row; a short last group is padded with its row's last entry while the scale is found,
and the padding is not stored). Per group, with ``b``-bit codes packed back to back:

- symmetric: ``qmax = 2^(b-1) - 1``, ``s = max|x| / qmax``, ``q = round(x / s) + qmax`` in
  [0, 2 qmax], decoded ``(q - qmax) s``: zero stays exactly zero (most of a delta is near 0);
- asymmetric: ``lo = min x``, ``s = (max x - lo) / (2^b - 1)``, ``q = round((x - lo) / s)``,
  decoded ``lo + q s`` (the "zero point" is stored as the fp16 group minimum ``lo``).

Scales (and ``lo``) are stored in ``scale_dtype`` (fp16 by default), rounded *outward*
(``s`` up, ``lo`` down) and the codes computed from the stored values, so nothing is
clipped and the error bound holds for what the file holds:

    |x - decode(x)| <= s / 2   per entry (s the group's stored scale; plus fp32 rounding)

Size: ``b + k * scale_bits / group_size`` bits per parameter, k = 1 (symmetric) or 2;
int4, groups of 64, fp16 scales: 4 + 16/64 = 4.25.

``svd_quant``: the top-r SVD triplets (rank direct, by energy or by bits, as in
:mod:`.svd`), ``dW ~ U diag(S) Vh``; each singular vector (a column of U, a row of Vh,
unit norm) is quantised in groups along its length, S is kept in fp32. The value is a
:class:`QuantLowRank` (codec ``lowrank_q``: bands of rank components, each band with its own
code width; Delta-CoMe builds several bands, ``svd_quant`` one). Error: with
``e_u, e_v`` the per-vector quantisation errors (each at most ``(1/2) sqrt(sum_g n_g s_g^2)``),
``|dW - decode|_F <= sqrt(sum_{i>r} S_i^2) + sum_{i<=r} S_i (|e_u| + |e_v| + |e_u| |e_v|)``.
With ``factors="as_is"`` a LoRA's ``B^T`` rows and ``A`` rows are quantised directly (QLoRA-
style storage of the factors; no SVD, the rank stays the LoRA's).
1-D deltas under ``svd_quant`` are quantised dense (a ``quant`` value): a vector has no factors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...core.fields import Checked, ConfigError, knob
from ...taskvec import Delta, LowRank, register_codec
from .._bits import pack, packed_bytes, unpack
from .._dtypes import dtype_name, dtype_of
from .._registry import CompressedValue, register_compressor
from .svd import SvdKnobs, choose_rank, spectrum

__all__ = ["QuantMatrix", "quantize", "Quantized", "QuantLowRank", "GroupKnobs", "QuantConfig", "SvdQuantConfig",
           "quant", "svd_quant", "quantize_bands", "matrix_bits", "vector_bits",
           "bands_bits", "quant_bits"]


# ----------------------------------------------------------------------------- one quantised matrix
@dataclass(frozen=True, eq=False)
class QuantMatrix:
    """A (rows, cols) matrix as packed ``bits``-bit codes and per-group scales (rows, ngroups)
    (+ ``offsets``, the group minima, when asymmetric). Not a codec: values are built of it."""

    codes: torch.Tensor           # uint8, packed_bytes(rows * cols, bits)
    scales: torch.Tensor          # (rows, ngroups) scale_dtype
    offsets: torch.Tensor | None  # (rows, ngroups) scale_dtype, or None (symmetric)
    rows: int
    cols: int
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.offsets is None

    @property
    def padded(self) -> int:
        return math.ceil(self.cols / self.group_size) * self.group_size

    def to_dense(self, work: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows, cols) in ``work``: ``(q - qmax) s`` or ``lo + q s`` per group."""
        q = unpack(self.codes, self.bits, self.rows * self.cols).to(work).reshape(self.rows, self.cols)
        q = torch.nn.functional.pad(q, (0, self.padded - self.cols)).reshape(self.rows, -1, self.group_size)
        s = self.scales.to(work)[..., None]
        x = (q - _qmax(self.bits)) * s if self.symmetric else self.offsets.to(work)[..., None] + q * s
        return x.reshape(self.rows, self.padded)[:, : self.cols]

    def parts(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}codes": self.codes, f"{prefix}scales": self.scales}
        if self.offsets is not None:
            out[f"{prefix}offsets"] = self.offsets
        return out

    def meta(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}

    @classmethod
    def from_parts(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str) -> QuantMatrix:
        offsets = None if meta["symmetric"] else tensors[f"{prefix}offsets"]
        return cls(tensors[f"{prefix}codes"], tensors[f"{prefix}scales"], offsets, int(meta["rows"]),
                   int(meta["cols"]), int(meta["bits"]), int(meta["group_size"]))


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _stored(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` in ``dtype``, rounded up (``up``) or down, never towards the wrong side: a scale
    stored a hair small would clip the group's extreme entry."""
    y = x.to(dtype)
    wrong = y.to(x.dtype) < x if up else y.to(x.dtype) > x
    y = torch.where(wrong, torch.nextafter(y, torch.full_like(y, math.inf if up else -math.inf)), y)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"quantise: expected group scales that fit {dtype_name(dtype)}, found "
                         f"{float(x.abs().max()):.3g}; use scale_dtype float32")
    return y


def quantize(mat: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float16) -> QuantMatrix:
    """Round-to-nearest ``bits``-bit codes of ``mat`` (rows, cols) in groups along each row."""
    if not 2 <= bits <= 8:
        raise ValueError(f"quantise: expected 2-8 bits, found {bits}")
    if not bool(torch.isfinite(mat).all()):
        raise ValueError("quantise: expected finite values, found inf or nan")
    rows, cols = mat.shape
    work = torch.float64 if mat.dtype == torch.float64 else torch.float32
    ngroups = math.ceil(cols / group_size)
    x = mat.to(work)
    if ngroups * group_size > cols and cols:  # edge padding leaves each group's min / max unchanged
        x = torch.cat([x, x[:, -1:].expand(rows, ngroups * group_size - cols)], 1)
    x = x.reshape(rows, ngroups, group_size)
    if symmetric:
        qmax = _qmax(bits)
        scales, offsets = _stored(x.abs().amax(-1) / qmax, scale_dtype, up=True), None
        s = scales.to(work)[..., None]
        q = torch.clamp(torch.round(x / torch.where(s > 0, s, 1)), -qmax, qmax) + qmax
    else:
        offsets = _stored(x.amin(-1), scale_dtype, up=False)
        lo = offsets.to(work)[..., None]
        scales = _stored((x.amax(-1, keepdim=True) - lo).squeeze(-1) / ((1 << bits) - 1), scale_dtype, up=True)
        s = scales.to(work)[..., None]
        q = torch.clamp(torch.round((x - lo) / torch.where(s > 0, s, 1)), 0, (1 << bits) - 1)
    codes = q.reshape(rows, -1)[:, :cols].to(torch.uint8)
    return QuantMatrix(pack(codes, bits), scales, offsets, rows, cols, bits, group_size)


def matrix_bits(rows: int, cols: int, bits: int, group_size: int, symmetric: bool, scale_bits: int) -> int:
    """Bits :func:`quantize` stores for a (rows, cols) matrix."""
    per_group = scale_bits * (1 if symmetric else 2)
    return 8 * packed_bytes(rows * cols, bits) + rows * math.ceil(cols / group_size) * per_group


# ----------------------------------------------------------------------------- quantised dense delta
@register_codec("quant")
class Quantized(CompressedValue):
    """``dW = scale * dequant(q)`` reshaped to ``shape`` (q: (out, prod(rest)), or (1, n) for 1-D)."""

    def __init__(self, q: QuantMatrix, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0):
        if q.rows * q.cols != math.prod(shape):
            raise ValueError(f"Quantized: expected {math.prod(shape)} codes for shape {tuple(shape)}, "
                             f"found {q.rows}x{q.cols}")
        self.q, self._shape, self._dtype, self.scale = q, tuple(int(s) for s in shape), dtype, float(scale)

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        work = torch.float64 if torch.float64 in (self._dtype, dtype) else torch.float32
        return (self.q.to_dense(work) * self.scale).reshape(self._shape).to(dtype or self._dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.q.parts("")

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self._shape), "dtype": dtype_name(self._dtype), "scale": self.scale, **self.q.meta()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Quantized:
        return cls(QuantMatrix.from_parts(tensors, meta, ""), tuple(meta["shape"]), dtype_of(meta["dtype"]),
                   float(meta["scale"]))

    def scaled(self, c: float) -> Quantized:
        return Quantized(self.q, self._shape, self._dtype, self.scale * float(c))


# ----------------------------------------------------------------------------- quantised factors
Band = tuple[QuantMatrix, QuantMatrix]  # (U^T rows (k, out), Vh rows (k, in)) of k rank components


@register_codec("lowrank_q")
class QuantLowRank(CompressedValue):
    """``dW = scale * sum_bands U_b^T.T diag(s_b) Vh_b`` with every band's singular vectors
    quantised at its own width; ``s`` (fp32, the singular values) is None for raw LoRA factors.
    Stored parts: ``s``, ``b{i}_U_codes``, ``b{i}_U_scales`` (``_offsets``), same for ``V``."""

    def __init__(self, bands: list[Band], s: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                 scale: float = 1.0):
        out, inn = shape[0], math.prod(shape[1:])
        for i, (u, v) in enumerate(bands):
            if u.rows != v.rows or u.cols != out or v.cols != inn:
                raise ValueError(f"QuantLowRank: expected band {i} as U^T (k, {out}) and Vh (k, {inn}), "
                                 f"found ({u.rows}, {u.cols}) and ({v.rows}, {v.cols})")
        if s is not None and s.numel() != sum(u.rows for u, _ in bands):
            raise ValueError(f"QuantLowRank: expected one singular value per rank "
                             f"({sum(u.rows for u, _ in bands)}), found {s.numel()}")
        self.bands, self.s = list(bands), s
        self._shape, self._dtype, self.scale = tuple(int(d) for d in shape), dtype, float(scale)

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)

    @property
    def rank(self) -> int:
        return sum(u.rows for u, _ in self.bands)

    def to_lowrank(self, work: torch.dtype = torch.float32) -> LowRank:
        """The dequantised factors as a :class:`LowRank` (B (out, r), A (r, in)): compact, exact."""
        out, inn = self._shape[0], math.prod(self._shape[1:])
        b = torch.cat([torch.zeros(out, 0, dtype=work)] + [u.to_dense(work).T for u, _ in self.bands], 1)
        a = torch.cat([torch.zeros(0, inn, dtype=work)] + [v.to_dense(work) for _, v in self.bands], 0)
        if self.s is not None:
            b = b * self.s.to(work)
        return LowRank(b, a, self.scale, self._shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        work = torch.float64 if torch.float64 in (self._dtype, dtype) else torch.float32
        return self.to_lowrank(work).to_dense(dtype or self._dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {} if self.s is None else {"s": self.s}
        for i, (u, v) in enumerate(self.bands):
            out |= u.parts(f"b{i}_U_") | v.parts(f"b{i}_V_")
        return out

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self._shape), "dtype": dtype_name(self._dtype), "scale": self.scale,
                "bands": [{"U": u.meta(), "V": v.meta()} for u, v in self.bands]}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> QuantLowRank:
        bands = [(QuantMatrix.from_parts(tensors, b["U"], f"b{i}_U_"), QuantMatrix.from_parts(tensors, b["V"], f"b{i}_V_"))
                 for i, b in enumerate(meta["bands"])]
        return cls(bands, tensors.get("s"), tuple(meta["shape"]), dtype_of(meta["dtype"]), float(meta["scale"]))

    def scaled(self, c: float) -> QuantLowRank:
        return QuantLowRank(self.bands, self.s, self._shape, self._dtype, self.scale * float(c))

    def added(self, other: Delta) -> Delta:
        if isinstance(other, LowRank):  # a sum of factored deltas stays factored
            return self.to_lowrank().added(other)
        return super().added(other)

    def norm(self) -> float:
        return self.to_lowrank(torch.float64).norm()


def quantize_bands(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, widths: list[tuple[int, int]],
                   knobs: GroupKnobs, shape: tuple[int, ...], dtype: torch.dtype) -> QuantLowRank:
    """Rank components of ``U diag(s) Vh`` in consecutive bands ``[(k, bits), ...]`` (largest
    singular values first), each singular vector quantised in groups along its length."""
    sdt, bands, at = dtype_of(knobs.scale_dtype), [], 0
    for k, bits in widths:
        k = min(k, u.shape[1] - at)  # a LoRA input has fewer components than a plan may ask for
        if k > 0:
            ut, v = u[:, at:at + k].T, vh[at:at + k]
            bands.append((quantize(ut, bits, knobs.group_size, knobs.symmetric, sdt),
                          quantize(v, bits, knobs.group_size, knobs.symmetric, sdt)))
            at += k
    return QuantLowRank(bands, s[:at].float().clone(), shape, dtype)


def vector_bits(out: int, inn: int, bits: int, knobs: GroupKnobs) -> float:
    """Bits one rank component costs in :func:`quantize_bands` (its two vectors + fp32 s)."""
    sb = dtype_of(knobs.scale_dtype).itemsize * 8
    per_group = sb * (1 if knobs.symmetric else 2)
    return bits * (out + inn) + (math.ceil(out / knobs.group_size) + math.ceil(inn / knobs.group_size)) * per_group + 32


def bands_bits(out: int, inn: int, widths: list[tuple[int, int]], knobs: GroupKnobs) -> int:
    """Bits :func:`quantize_bands` stores for bands ``[(k, bits), ...]`` (exact, byte padding included)."""
    sb = dtype_of(knobs.scale_dtype).itemsize * 8
    return sum(matrix_bits(k, out, b, knobs.group_size, knobs.symmetric, sb)
               + matrix_bits(k, inn, b, knobs.group_size, knobs.symmetric, sb) + 32 * k for k, b in widths if k)


# ----------------------------------------------------------------------------- configs and compressors
@dataclass(frozen=True)
class GroupKnobs(Checked):
    group_size: int = knob(64, ge=1, log=True, doc="entries per quantisation group (along the input dim)")
    symmetric: bool = knob(True, doc="symmetric codes around 0 (one scale), else min + scale (two per group)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = knob("float16", doc="dtype of the group scales")


@dataclass(frozen=True)
class QuantConfig(GroupKnobs):
    bits: int = knob(4, ge=2, le=8, doc="code width: 8 (int8), 4 (int4), 3 or 2")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


def quant_bits(cfg: QuantConfig, shape: tuple[int, ...]) -> float:
    rows, cols = _rows_cols(shape)
    sb = dtype_of(cfg.scale_dtype).itemsize * 8
    return matrix_bits(rows, cols, cfg.bits, cfg.group_size, cfg.symmetric, sb) / max(1, rows * cols)


@register_compressor("quant", config=QuantConfig, paper="round-to-nearest per-group (as in GPTQ/AWQ's baselines)",
                     bits=quant_bits)
def quant(dw: torch.Tensor, cfg: QuantConfig) -> Quantized:
    """per-group int8/int4/3/2-bit round-to-nearest codes, fp16 scales"""
    if dw.dim() == 0:
        raise ValueError("quant: expected a delta with at least 1 dimension, found a 0-d tensor")
    mat = dw.detach().reshape(*_rows_cols(tuple(dw.shape)))
    q = quantize(mat, cfg.bits, cfg.group_size, cfg.symmetric, dtype_of(cfg.scale_dtype))
    return Quantized(q, tuple(dw.shape), dw.dtype)


@dataclass(frozen=True)
class SvdQuantConfig(SvdKnobs, GroupKnobs):
    qbits: int = knob(4, ge=2, le=8, doc="code width of the quantised singular vectors / factors")
    factors: Literal["svd", "as_is"] = knob("svd", doc="a LoRA input: re-factor by SVD, or quantise its B, A as they are")

    def validate(self) -> None:
        super().validate()
        if self.factors == "as_is" and any(getattr(self, n) is not None for n in ("rank", "energy", "bits")):
            raise ConfigError("SvdQuantConfig: expected no rank / energy / bits with factors='as_is' "
                              "(the LoRA's own rank is kept)")


def _dense_cfg(cfg: SvdQuantConfig) -> QuantConfig:
    return QuantConfig(group_size=cfg.group_size, symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype,
                       bits=cfg.qbits)


def _svd_quant_rank(cfg: SvdQuantConfig, shape: tuple[int, ...]) -> int | None:
    out, inn = shape[0], math.prod(shape[1:])
    r = choose_rank(cfg, shape, vector_bits(out, inn, cfg.qbits, cfg))
    while r and cfg.bits is not None and _svd_quant_total(cfg, out, inn, r) > cfg.bits * out * inn:
        r -= 1  # byte padding of the packed codes can tip the last rank over the budget
    return r


def _svd_quant_total(cfg: SvdQuantConfig, out: int, inn: int, r: int) -> int:
    return bands_bits(out, inn, [(r, cfg.qbits)], cfg)


def _svdquant_bits(cfg: SvdQuantConfig, shape: tuple[int, ...]) -> float | None:
    """Bits per parameter; None when it depends on the spectrum (``energy``) or on a LoRA's rank."""
    if len(shape) == 1:
        return quant_bits(_dense_cfg(cfg), shape)
    if cfg.factors == "as_is":
        return None
    r = _svd_quant_rank(cfg, shape)
    return None if r is None else _svd_quant_total(cfg, shape[0], math.prod(shape[1:]), r) / math.prod(shape)


@register_compressor("svd_quant", config=SvdQuantConfig, paper="SVD factors then per-group round-to-nearest",
                     bits=_svdquant_bits)
def svd_quant(dw: torch.Tensor | LowRank, cfg: SvdQuantConfig) -> QuantLowRank | Quantized:
    """truncated SVD, singular vectors quantised per group (or a LoRA's B, A quantised)"""
    shape = tuple(dw.shape)
    if len(shape) == 1:
        return quant(dw, _dense_cfg(cfg))
    if cfg.factors == "as_is":
        return _quantize_lora(dw, cfg)
    u, s, vh = spectrum(dw, cfg, _svd_quant_rank(cfg, shape), cfg.energy)
    return quantize_bands(u, s, vh, [(s.numel(), cfg.qbits)], cfg, shape, dw.dtype)


def _quantize_lora(lr: torch.Tensor | LowRank, cfg: SvdQuantConfig) -> QuantLowRank:
    if not isinstance(lr, LowRank):
        raise TypeError(f"svd_quant: expected a LowRank (a LoRA) with factors='as_is', found {type(lr).__name__}")
    sdt = dtype_of(cfg.scale_dtype)
    band = (quantize(lr.B.detach().T, cfg.qbits, cfg.group_size, cfg.symmetric, sdt),
            quantize(lr.A.detach(), cfg.qbits, cfg.group_size, cfg.symmetric, sdt))
    return QuantLowRank([band] if lr.rank else [], None, lr.shape, lr.dtype, lr.scale)
