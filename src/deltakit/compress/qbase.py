"""A quantised base for QLoRA and LQ-LoRA: linear weights stored 8- or 4-bit, per group.

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) trains a LoRA on a frozen
base whose linear weights are stored 4-bit and dequantised on the fly; LQ-LoRA (Guo et al.
2023, https://arxiv.org/abs/2311.12023) starts that LoRA from the quantisation error,

    W ~ Q + L1 L2:   repeat  L1 L2 = SVD_r(W - Q),  Q = quant(W - L1 L2)

so quantised base + LoRA at step 0 is closer to ``W`` than ``Q`` alone.

Why our own code: torchao is not installed here (and bitsandbytes has no CPU kernels in
this venv), so this is a small documented implementation in plain torch. Storage of one
weight (flattened, cut into groups of ``group_size`` consecutive entries, the last one
padded with zeros), per :class:`QuantConfig` ``scheme``:

* ``symmetric``: ``s = absmax / qmax`` (fp16, ``qmax = 2**(bits-1) - 1``), codes
  ``clamp(round(w / s), -qmax, qmax) + 2**(bits-1)``; ``w' = (code - 2**(bits-1)) * s``.
  Error per entry <= s / 2 (up to the fp16 rounding of ``s``).
* ``asymmetric``: ``s = (max - min) / (2**bits - 1)`` and ``m = min`` (both fp16), codes
  ``clamp(round((w - m) / s), 0, 2**bits - 1)``; ``w' = code * s + m``. Error <= s / 2 (+ fp16).
* ``nf4`` (QLoRA's NormalFloat, 4 bits only): ``s = absmax`` (fp16), code = the nearest of the
  16 NF4 levels to ``w / s``; ``w' = NF4[code] * s``. Error <= 0.1519 s (half the widest gap).

4-bit codes are packed two per byte, low nibble first (the layout of
:func:`deltakit.compress._bits.pack` with 4 bits), so int4/nf4 costs ``4 + 16 / group_size``
bits per weight (asymmetric ``4 + 32 / group_size``). QLoRA's double quantisation of the
scales is not implemented (0.25 of 4.25 bits at group 64).

Training: :func:`deltakit.attach` puts a LoRA beside each :class:`QuantLinear` (a
:class:`~deltakit.core.packed.PackedLinear`), unmerged. Merging into it is refused (a merge
would requantise, lossy and not exactly undoable); :func:`dequantize_base` turns the base
back into ``nn.Linear`` (weights ``= Q`` exactly), after which merge works as usual.

Fingerprint: an adapter trained on a quantised base records the fingerprint of the
*quantised* base (codes and scales are persistent buffers): the adapter was fitted to ``Q``
(with LQ-LoRA it even encodes ``W - Q``), so it belongs to that base. Quantisation is
deterministic, so quantising the same base with the same config gives the same fingerprint
and the adapter loads; onto the full-precision model it is refused (the targets are
``QuantLinear`` in the manifest). To serve it merged: load on the quantised base,
:func:`dequantize_base`, merge.

>>> import torch
>>> lin = torch.nn.Sequential(torch.nn.Linear(64, 8))
>>> quantize_base(lin, QuantConfig(bits=4, group_size=32))
['0']
>>> lin[0].codes.numel(), lin[0].scales.numel()   # 512 codes, 2 per byte; 16 groups
(256, 16)
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import Adapter, attach, model_state
from ..core.fields import Checked, ConfigError, knob
from ..core.layer import DeltaLayer
from ..core.packed import PackedLinear
from ..core.targets import default_targets, select_targets
from ..methods.lora import LoraConfig

__all__ = ["QuantConfig", "QuantParts", "QuantLinear", "NF4", "quantize_tensor", "dequantize_tensor",
           "quantize_base", "dequantize_base", "base_bytes", "lq_decompose", "LQResult", "lq_lora"]

# The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table):
# quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


@dataclass(frozen=True)
class QuantConfig(Checked):
    """How a base weight is stored."""

    bits: Literal[4, 8] = knob(4, doc="bits per weight code")
    group_size: int = knob(64, ge=2, log=True, doc="consecutive weights (flattened) sharing one fp16 scale")
    scheme: Literal["symmetric", "asymmetric", "nf4"] = knob(
        "symmetric", doc="``symmetric``: codes around 0, scale absmax/qmax; ``asymmetric``: scale and offset "
                         "from min/max; ``nf4``: QLoRA's NormalFloat levels times absmax (4 bits only)")

    def validate(self) -> None:
        if self.scheme == "nf4" and self.bits != 4:
            raise ConfigError(f"QuantConfig.bits: expected 4 with scheme 'nf4', found {self.bits}")
        if self.group_size % 2:
            raise ConfigError(f"QuantConfig.group_size: expected an even size (4-bit codes pair up in bytes), "
                              f"found {self.group_size}")

    def bits_per_weight(self) -> float:
        """Stored bits per weight: the code plus its share of the fp16 scale (and offset)."""
        return self.bits + 16 * (2 if self.scheme == "asymmetric" else 1) / self.group_size


class QuantParts(NamedTuple):
    """One quantised tensor: uint8 ``codes`` (packed two per byte at 4 bits), fp16 ``scales``
    (one per group) and, for the asymmetric scheme, fp16 ``offsets`` (else None)."""

    codes: Tensor
    scales: Tensor
    offsets: Tensor | None


# ----------------------------------------------------------------------------- pure maths
def _groups(w: Tensor, group_size: int) -> Tensor:
    """``w`` flattened into (G, group_size) fp32 rows, the tail padded with zeros."""
    flat = w.detach().reshape(-1).float()
    pad = -flat.numel() % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size)


def _fp16(x: Tensor, what: str) -> Tensor:
    h = x.half()
    if not torch.isfinite(h).all():
        raise ValueError(f"quantize: expected {what} within fp16 range (|x| <= 65504), found {float(x.abs().max())}")
    return h


def _pack4(codes: Tensor) -> Tensor:
    pairs = codes.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def quantize_tensor(w: Tensor, config: QuantConfig) -> QuantParts:
    """Quantise ``w`` (any shape, floating) per group as the module docstring says; never mutates it."""
    if not w.is_floating_point() or not torch.isfinite(w).all():
        raise ValueError(f"quantize: expected a finite floating tensor, found {w.dtype} "
                         f"{'with NaN/inf' if w.is_floating_point() else ''}".rstrip())
    g = _groups(w, config.group_size)                         # (G, gs)
    offsets = None
    if config.scheme == "asymmetric":
        lo, hi = g.min(1).values, g.max(1).values
        scales = _fp16((hi - lo) / (2 ** config.bits - 1), "scales")
        offsets = _fp16(lo, "offsets")
        s = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[:, None]
        codes = ((g - offsets.float()[:, None]) / s).round().clamp(0, 2 ** config.bits - 1)
    elif config.scheme == "nf4":
        scales = _fp16(g.abs().max(1).values, "scales")
        s = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[:, None]
        levels = NF4.to(g.device)
        # nearest level through the midpoints between levels (sorted): no (G, gs, 16) tensor
        codes = torch.bucketize((g / s).clamp(-1, 1), (levels[1:] + levels[:-1]) / 2)
    else:
        qmax = 2 ** (config.bits - 1) - 1
        scales = _fp16(g.abs().max(1).values / qmax, "scales")
        s = scales.float().clamp_min(torch.finfo(torch.float16).tiny)[:, None]
        codes = (g / s).round().clamp(-qmax, qmax) + 2 ** (config.bits - 1)
    codes = codes.to(torch.uint8).reshape(-1)
    return QuantParts(_pack4(codes) if config.bits == 4 else codes, scales, offsets)


def _byte_levels(levels: Tensor) -> Tensor:
    """(256, 2): the values of a byte's low and high 4-bit code, so unpacking and decoding a
    packed byte is one gather (a third of the time of unpacking nibbles and then decoding)."""
    b = torch.arange(256)
    return torch.stack((levels[b & 15], levels[b >> 4]), dim=-1)


# per 4-bit scheme, the value of each code before the group scale (and offset) apply
_LUT4 = {"symmetric": _byte_levels(torch.arange(16.0) - 8), "asymmetric": _byte_levels(torch.arange(16.0)),
         "nf4": _byte_levels(NF4)}


def dequantize_tensor(parts: QuantParts, config: QuantConfig, shape: Sequence[int],
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense tensor of ``shape`` that ``parts`` stores, in ``dtype`` (computed in fp32).

    Runs on every forward of a :class:`QuantLinear`, so it allocates one fp32 tensor and
    works in place on it.
    """
    s = parts.scales.float()[:, None]
    if config.bits == 4:
        lut = _LUT4[config.scheme].to(parts.codes.device)
        w = lut.index_select(0, parts.codes.int()).view(-1, config.group_size).mul_(s)
    else:
        w = parts.codes.view(-1, config.group_size).float()
        w = w.mul_(s) if config.scheme == "asymmetric" else w.sub_(2 ** (config.bits - 1)).mul_(s)
    if parts.offsets is not None:
        w = w.add_(parts.offsets.float()[:, None])
    return w.view(-1)[: math.prod(shape)].view(*shape).to(dtype)


# ----------------------------------------------------------------------------- the module
class _QuantMatmul(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantised in forward and again in backward, so autograd saves
    only the packed codes (through the module), never a dense copy of the weight: training
    memory stays at the quantised size (QLoRA's bitsandbytes matmul does the same)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: "QuantLinear") -> Tensor:  # noqa: D102
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad @ ctx.module.dequantize(grad.dtype), None


class QuantLinear(PackedLinear):
    """``y = x @ W'.T + b`` with ``W'`` rebuilt per call from per-group codes (buffers).

    ``codes`` (uint8), ``scales`` (fp16 bits stored as int16, one per group) and, asymmetric
    only, ``offsets`` (likewise) are persistent buffers: :meth:`parts` gives them as fp16.
    ``bias`` stays a (frozen by attach) parameter in the original dtype; ``weight_dtype`` is the
    original weight's dtype, the default of :meth:`dequantize`.
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, parts: QuantParts,
                 bias: Tensor | None, weight_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.weight_dtype = weight_dtype
        self.register_buffer("codes", parts.codes)
        # fp16 scales kept as their int16 bit patterns: ``model.to(torch.bfloat16)`` / ``.float()``
        # convert floating buffers, which would silently re-round (or bloat) them
        self.register_buffer("scales", parts.scales.view(torch.int16))
        self.register_buffer("offsets", None if parts.offsets is None else parts.offsets.view(torch.int16))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        return cls(linear.in_features, linear.out_features, config, quantize_tensor(linear.weight, config),
                   linear.bias, linear.weight.dtype)

    def parts(self) -> QuantParts:
        offsets = None if self.offsets is None else self.offsets.view(torch.float16)
        return QuantParts(self.codes, self.scales.view(torch.float16), offsets)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_tensor(self.parts(), self.config, (self.out_features, self.in_features),
                                 dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _QuantMatmul.apply(x, self)
        else:
            out = F.linear(x, self.dequantize(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={c.bits}, scheme={c.scheme}, group_size={c.group_size}")


# ----------------------------------------------------------------------------- models
def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor once (tied weights count once)."""
    seen: dict[int, Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def _linear_targets(model: nn.Module, targets: Iterable[str] | None, exclude: Iterable[str]) -> list[str]:
    """Paths of the ``nn.Linear`` modules to quantise. Default: every one except the output
    head (``get_output_embeddings()``, often tied to the input embedding, and the layer QLoRA
    keeps in full precision too)."""
    exclude = list(exclude)
    if targets is not None:
        return select_targets(model, list(targets), types=[nn.Linear], exclude=exclude)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    paths = [p for p in paths if not any(p == e or p.endswith("." + e) for e in exclude)]
    if not paths:
        raise ValueError(f"quantize_base: expected nn.Linear layers (besides the output head) in "
                         f"{type(model).__name__}, found none")
    return paths


def _check_untied(model: nn.Module, paths: Sequence[str]) -> None:
    users: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), []).append(name)
    for path in paths:
        shared = [u for u in users.get(id(model.get_submodule(path).weight), []) if u != path]
        if shared:
            raise ValueError(f"quantize_base: {path}.weight is tied to {shared[0]}; quantising it would untie them "
                             "(exclude it)")


def _require_plain(model: nn.Module) -> None:
    if model_state(model) is not None:
        raise ValueError("quantize_base: expected a model without adapters, found adapters attached; quantise "
                         "the base first, then attach")


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_base(model: nn.Module, config: QuantConfig | None = None, *, targets: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> list[str]:
    """Replace ``model``'s target ``nn.Linear`` layers by :class:`QuantLinear`, in place, one
    layer at a time (the full-precision weight is freed as its layer is replaced). Returns
    the quantised paths, in model order.

    ``targets``: module names / suffixes / ``re:`` patterns (as adapters take them), default
    every linear but the output head. Quantise before attaching adapters.
    """
    config = config or QuantConfig()
    paths = _linear_targets(model, targets, exclude)
    _swap_in(model, paths, config, {})
    return paths


@torch.no_grad()
def _swap_in(model: nn.Module, paths: Sequence[str], config: QuantConfig, given: dict[str, QuantParts]) -> None:
    """Replace each linear at ``paths`` by its QuantLinear (``given``: parts already computed)."""
    _require_plain(model)
    _check_untied(model, paths)
    for path in paths:
        lin = model.get_submodule(path)
        parts = given[path] if path in given else quantize_tensor(lin.weight, config)
        _replace(model, path, QuantLinear(lin.in_features, lin.out_features, config, parts, lin.bias,
                                          lin.weight.dtype))


@torch.no_grad()
def dequantize_base(model: nn.Module) -> list[str]:
    """Replace every :class:`QuantLinear` (also under an attached adapter) by an ``nn.Linear``
    holding exactly the dequantised weight, so adapters can merge into it. Returns the paths."""
    frozen = model_state(model) is not None
    done = []
    for path, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.codes.device,
                        dtype=m.weight_dtype)
        lin.weight.copy_(m.dequantize())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        lin.requires_grad_(not frozen)
        _replace(model, path, lin)
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        done.append(path.rpartition(".")[0] if isinstance(parent, DeltaLayer) else path)
    return done


# ----------------------------------------------------------------------------- LQ-LoRA
class LQResult(NamedTuple):
    """``W ~ dequant(parts) + B @ A``; ``errors[i]``: ``|W - Q - B A|_F / |W|_F`` after
    iteration ``i`` (``errors[0]``: plain quantisation, no low-rank part)."""

    parts: QuantParts
    B: Tensor        # (out, r)
    A: Tensor        # (r, in)
    errors: list[float]


def _svd_r(m: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Best rank-``r`` approximation of ``m`` as balanced factors ``(U sqrt(S), sqrt(S) V^T)``."""
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


@torch.no_grad()
def lq_decompose(w: Tensor, r: int, config: QuantConfig, iterations: int = 5) -> LQResult:
    """LQ-LoRA's alternating fit (Guo et al. 2023, eq. 2 without the Fisher weights): from
    ``L = 0``, repeat ``Q = quant(W - L)``, ``L = SVD_r(W - dequant(Q))``; keep the best
    iterate by relative error. One iteration is already better than plain quantisation
    (Eckart-Young: ``|W - Q - SVD_r(W - Q)| <= |W - Q|``)."""
    if w.dim() != 2 or not 1 <= r <= min(w.shape):
        raise ValueError(f"lq_decompose: expected a 2-D weight and 1 <= r <= {min(w.shape) if w.dim() == 2 else '?'}, "
                         f"found shape {tuple(w.shape)} and r={r}")
    W = w.detach().float()
    norm = float(W.norm()) or 1.0
    B, A = W.new_zeros(W.shape[0], r), W.new_zeros(r, W.shape[1])
    parts = quantize_tensor(W, config)
    Q = dequantize_tensor(parts, config, W.shape)
    errors = [float((W - Q).norm()) / norm]
    best = (errors[0], parts, B, A)
    for _ in range(iterations):
        B, A = _svd_r(W - Q, r)
        err = float((W - Q - B @ A).norm()) / norm
        errors.append(err)
        if err < best[0]:
            best = (err, parts, B, A)
        parts = quantize_tensor(W - B @ A, config)
        Q = dequantize_tensor(parts, config, W.shape)
    return LQResult(best[1], best[2], best[3], errors)


def lq_lora(model: nn.Module, lora: LoraConfig, config: QuantConfig | None = None, *,
            targets: Iterable[str] | None = None, exclude: Iterable[str] = (), iterations: int = 5,
            name: str = "default") -> tuple[Adapter, dict[str, LQResult]]:
    """Quantise ``model``'s base (as :func:`quantize_base`) and attach a LoRA initialised
    LQ-LoRA style: where a LoRA target is quantised, its weight is stored as ``Q`` and the
    LoRA starts at ``s B A = L1 L2`` (:func:`lq_decompose` with ``r = lora.r``), so the model at
    step 0 approximates the full-precision one. Other LoRA targets start as usual (B = 0).
    Returns the adapter and each decomposed target's :class:`LQResult` (its errors)."""
    config = config or QuantConfig()
    _require_plain(model)
    lora_paths = set(select_targets(model, list(lora.targets or default_targets(model)), types=lora.target_types,
                                    layers=lora.layers, exclude=lora.exclude))
    paths = _linear_targets(model, targets, exclude)
    fits = {p: lq_decompose(model.get_submodule(p).weight, lora.r, config, iterations)
            for p in paths if p in lora_paths}
    _swap_in(model, paths, config, {p: f.parts for p, f in fits.items()})
    adapter = attach(model, lora, name)
    _start_from(adapter, fits)
    return adapter, fits


@torch.no_grad()
def _start_from(adapter: Adapter, fits: dict[str, LQResult]) -> None:
    for path, d in adapter.deltas():
        if path in fits:
            root = math.sqrt(d.scale)
            d.lora_B.copy_(fits[path].B / root)
            d.lora_A.copy_(fits[path].A / root)
