"""LoRA: Low-Rank Adaptation (Hu et al., 2021) https://arxiv.org/abs/2106.09685

    W' = W + s * B @ A,   A: (r, in), B: (out, r), s = alpha / r  (rsLoRA: alpha / sqrt(r),
    Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)

B starts at zero, so the adapted model starts equal to the base. Supports
``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv2d`` (A is a conv with the base's
kernel, B a 1x1 conv), ``nn.Embedding`` (A: (r, num_embeddings), B: (dim, r)) and
a quantised linear (:class:`~deltakit.core.packed.PackedLinear`, QLoRA: the update
stays unmerged beside it).

>>> import torch, deltakit as dk
>>> lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(lin, dk.LoraConfig(r=2, alpha=4, targets=["0"]))
>>> [tuple(p.shape) for p in ad.parameters()]
[(2, 8), (4, 2)]
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.delta import CACHE_PREFIX, BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.packed import PackedLinear
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._base_ops import Conv1D, device_of, in_out

__all__ = ["LoraConfig", "LoRA", "lora_scale"]


@dataclass(frozen=True)
class LoraConfig(DeltaConfig):
    """LoRA hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="rank of the update")
    alpha: float = knob(16.0, gt=0, log=True, doc="scale numerator; the update is multiplied by ``alpha / r``")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the LoRA branch input (training only)")
    use_rslora: bool = knob(False, doc="scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA)")
    init: Literal["kaiming", "gaussian", "orthogonal"] = knob(
        "kaiming", doc="initialisation of A (B is always zero): ``kaiming`` (uniform, a=sqrt(5), as ``nn.Linear`` "
                       "and peft), ``gaussian`` (N(0, 1/r)), ``orthogonal`` (orthonormal rows)")
    compute_dtype: Literal["adapter", "input"] = knob(
        "adapter", doc="dtype the low-rank branch runs in. ``adapter`` (default): the factors' own dtype, so fp32 "
                       "factors under a bf16 base see fp32 inputs. ``input``: the input's dtype, casting the "
                       "factors per step as autocast does; the factors (and AdamW's state) stay fp32 while the "
                       "matmuls run at bf16 speed. Gradients reaching the factors are then bf16-rounded")


def lora_scale(config: LoraConfig) -> float:
    return config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


@register_method("lora", LoraConfig, paper="https://arxiv.org/abs/2106.09685",
                 description="low-rank update W + (alpha/r) B A")
class LoRA(WeightDelta):
    # PackedLinear: a quantised base (QLoRA); the residual path never needs its weight
    supported = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding, PackedLinear)

    def __init__(self, base: nn.Module, config: LoraConfig, ctx: BuildContext | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"LoRA on grouped Conv2d is not supported (groups={base.groups})")
        dev = device_of(base)
        dtype = param_dtype(base, config.adapter_dtype)
        fan_in, fan_out = in_out(base)
        r = config.r
        if isinstance(base, nn.Conv2d):
            a_shape = (r, fan_in, *base.kernel_size)
            b_shape = (fan_out, r, 1, 1)
        elif isinstance(base, nn.Embedding):
            a_shape, b_shape = (r, fan_in), (fan_out, r)
        else:
            a_shape, b_shape = (r, fan_in), (fan_out, r)
        self.layout = ("conv2d" if isinstance(base, nn.Conv2d) else "embedding" if isinstance(base, nn.Embedding)
                       else "conv1d" if isinstance(base, Conv1D) else "linear")
        self.r = r
        self.scale = lora_scale(config)
        self.compute_dtype = config.compute_dtype
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=dev, dtype=dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters(config.init, embedding=isinstance(base, nn.Embedding))

    @torch.no_grad()
    def reset_parameters(self, init: str, embedding: bool = False) -> None:
        if embedding:
            # peft's choice for embeddings: A = 0, B ~ N(0, 1); the product is still 0.
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.orthogonal_(self.lora_A.view(self.r, -1))
        nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------ maths
    def product(self) -> Tensor:
        """``s * B @ A`` in the base weight's layout."""
        return _dense(self.lora_A, self.lora_B, self.layout, self.scale)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"weight": self.product()}

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, ...]]:
        """``(B', A', s, shape)`` with ``dW = s * B' @ A'`` reshaped to the weight's layout.

        B': (rows, r), A': (r, cols); Conv1D and Embedding weights are stored transposed,
        so their factors swap and transpose; conv kernels flatten (in, kh, kw) into cols.
        """
        A, B = self.lora_A, self.lora_B
        if self.layout == "conv2d":
            out = B.shape[0]
            return B.reshape(out, self.r), A.reshape(self.r, -1), self.scale, (out, *A.shape[1:])
        if self.layout in ("conv1d", "embedding"):
            return A.t(), B.t(), self.scale, (A.shape[1], B.shape[0])
        return B, A, self.scale, (B.shape[0], A.shape[1])

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        """``s * B(A(dropout(x)))`` without forming ``B @ A``.

        The scale multiplies the rank-r activations ``h``, not the (B, ..., out)
        output: r/out of the elementwise work, forward and backward.
        """
        A, B = _compute_factors(self, x)
        drop = self._modules["dropout"]
        if not isinstance(drop, nn.Identity):  # no module call per decode step when there is none
            x = drop(_cast(x, A))
        elif not _autocast_keeps(x):
            x = _cast(x, A)
        h = _down(base, x, A) * self.scale  # (B, ..., r)
        return _up(base, h, B)

    @classmethod
    def mixed_residual(cls, base: nn.Module, deltas: Sequence["LoRA"], row: Tensor, x: Tensor,
                       into: Tensor | None = None) -> Tensor:
        """Rows with different adapters in one pass (row: (B,) index into ``deltas`` or -1, the
        base), at a cost that does not grow with the number of distinct adapters: rank groups,
        per-row gathered factors and batched matmuls (see :mod:`deltakit.methods._mixed` for the
        cost model). Mixed ranks are never padded; -1 rows add exactly zero. With ``into`` (the
        base output) it returns ``into + residual``, accumulated in place when autograd is off.
        Pass ``row`` on the CPU (``DeltaLayer`` does) and a CUDA forward needs no device sync."""
        from ._mixed import mixed_lora_residual  # the kernel module imports this one's helpers

        return mixed_lora_residual(base, deltas, row, x, into)

    @classmethod
    def mixed_residual_concat(cls, base: nn.Module, deltas: Sequence["LoRA"], row: Tensor, x: Tensor,
                              into: Tensor | None = None) -> Tensor:
        """The earlier mixed path, kept as a reference and for the serving benchmark: routing with
        one-hot weights per row through :meth:`routed_residual`, i.e. every row runs through every
        adapter's factors concatenated (cost: one LoRA of rank ``sum_k r_k`` per row)."""
        onehot = (row[:, None] == torch.arange(len(deltas), device=row.device)[None, :]).float()
        res = cls.routed_residual(base, deltas, onehot, x)
        return res if into is None else into + res.to(into.dtype)

    @classmethod
    def routed_residual(cls, base: nn.Module, deltas: Sequence["LoRA"], weights: Tensor, x: Tensor,
                        heads: int = 1) -> Tensor:
        """``sum_k w_k * s_k B_k A_k x`` in one pass, for any mix of ranks: concatenate every
        adapter's factors, run ``x`` through the stacked A once, scale each rank column by its
        adapter's weight (and scale), then one stacked B. Cost: one LoRA of rank sum(r_k).

        weights: ``(B, K)`` per row or ``(B, T, K)`` per token (``x`` (B, T, in)); with
        ``heads > 1`` a trailing head axis, adapter k's rank split into ``heads`` equal blocks
        (Multi-Head Routing, Caccia et al. 2023), block j weighted by ``weights[..., k, j]``.
        Conv2d takes per-row weights only.
        """
        A, B = _stacked(base, deltas, x)
        dt = A.dtype
        m = _rank_weights(deltas, weights.to(device=x.device, dtype=dt), heads)  # (..., R)
        h = _down(base, _cast(x, A), A)                             # (B, ..., R) or (B, R, H, W)
        if isinstance(base, nn.Conv2d):
            if m.dim() != 2:
                raise ValueError(f"a routed Conv2d takes per-row weights (B, K); got {tuple(weights.shape)}")
            h = h * m[:, :, None, None]
        else:
            h = h * m.reshape(*m.shape[:-1], *([1] * (h.dim() - m.dim())), m.shape[-1])
        return _up(base, h, B)


def _stacked(base: nn.Module, deltas: Sequence, x: Tensor) -> tuple[Tensor, Tensor]:
    """Every adapter's factors concatenated along the rank: ``A`` (R, in[, kh, kw]), ``B`` (out, R[, 1, 1]).

    Without autograd the pair is cached on the base module, keyed by the factor tensors' identity
    and version counters (an in-place update, e.g. an optimiser step, misses the cache): decoding
    would otherwise concatenate every adapter's factors again at every layer for every token.
    """
    key = None
    if not torch.is_grad_enabled():
        # the factor tensors themselves are held in the key, so their ids cannot be reused meanwhile
        key = (x.dtype, [(d.lora_A, d.lora_A._version, d.lora_B, d.lora_B._version) for d in deltas])
        hit = base.__dict__.get(CACHE_PREFIX + "stacked")
        if hit is not None and _same_key(hit[0], key):
            return hit[1]
    pairs = [_compute_factors(d, x) for d in deltas]
    A = torch.cat([a for a, _ in pairs], dim=0)
    B = torch.cat([b.to(A.dtype) for _, b in pairs], dim=1)
    if key is not None:
        base.__dict__[CACHE_PREFIX + "stacked"] = (key, (A, B))
    return A, B


def _same_key(a, b) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        p[0] is q[0] and p[1] == q[1] and p[2] is q[2] and p[3] == q[3] for p, q in zip(a[1], b[1]))


def _rank_weights(deltas: Sequence, weights: Tensor, heads: int) -> Tensor:
    """Per-rank-column multipliers ``(..., R)``: each column's adapter weight times its scale."""
    ranks = [int(d.r) for d in deltas]
    dev = weights.device
    owner = torch.repeat_interleave(torch.arange(len(deltas), device=dev), torch.tensor(ranks, device=dev))
    scales = torch.tensor([d.scale for d in deltas], device=dev, dtype=weights.dtype)[owner]
    if heads == 1:
        return weights[..., owner] * scales
    bad = [r for r in ranks if r % heads]
    if bad:
        raise ValueError(f"multi-head routing with {heads} heads needs ranks divisible by it; got ranks {ranks}")
    head = torch.cat([torch.arange(r, device=dev) // (r // heads) for r in ranks])
    return weights[..., owner, head] * scales


def _compute_factors(d, x: Tensor) -> tuple[Tensor, Tensor]:
    """(A, B) in the dtype the branch runs in (see ``LoraConfig.compute_dtype``); ``d`` may be
    any object with ``lora_A`` / ``lora_B`` (bank methods pass views)."""
    A, B = d.lora_A, d.lora_B
    if getattr(d, "compute_dtype", "adapter") == "input" and x.is_floating_point() and x.dtype != A.dtype:
        return A.to(x.dtype), B.to(x.dtype)
    return A, B


def _cast(x: Tensor, like: Tensor) -> Tensor:
    return x if not x.is_floating_point() or x.dtype == like.dtype else x.to(like.dtype)


def _autocast_keeps(x: Tensor) -> bool:
    """True when autocast would run the branch's matmul / conv in ``x``'s own dtype anyway.

    Then casting ``x`` up to fp32 factors first is an exact round trip (bf16 -> fp32 -> bf16)
    that costs a pass over the activations forward and another backward, on every LoRA layer
    whose input is already low precision (Llama's o_proj and down_proj under bf16 autocast);
    skipping it changes no number of the output or of any gradient (tested). peft does the
    round trip. Not with dropout: its random mask is drawn in the cast dtype.
    """
    dev = x.device.type
    return x.is_floating_point() and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == x.dtype


def _down(base: nn.Module, x: Tensor, A: Tensor) -> Tensor:
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)
    return x @ A.t()


def _up(base: nn.Module, h: Tensor, B: Tensor) -> Tensor:
    if isinstance(base, nn.Conv2d):
        return F.conv2d(h, B)
    return h @ B.t()


def _dense(A: Tensor, B: Tensor, kind: str, scale: float) -> Tensor:
    if kind == "conv2d":
        out, r = B.shape[:2]
        return (B.reshape(out, r) @ A.reshape(A.shape[0], -1)).reshape(out, *A.shape[1:]) * scale
    prod = (B @ A) * scale                       # (out, in)
    return prod.t() if kind in ("conv1d", "embedding") else prod
