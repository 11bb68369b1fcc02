"""BitDelta: one sign bit per entry of ``dW`` plus one scale per matrix, optionally distilled.

Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit"
(https://arxiv.org/abs/2402.10193)::

    decode = alpha * sign(dW),   alpha = mean |dW|   (the scale minimising |dW - decode|_F)

Error: ``|dW - decode|_F^2 = sum (|dW_i| - alpha)^2 = |dW|_F^2 - n alpha^2``, i.e. ``n``
times the variance of ``|dW|`` (relative error ``sqrt(1 - 2/pi) = 0.60`` for a Gaussian delta:
BitDelta relies on the model, not on each matrix being close). Storage (:class:`BitDelta`):
the signs packed 1 bit per entry and the scale as one fp32, so ``1 + 32 / n`` bits per
parameter (1.0005 on a 256 x 256 matrix).

Scale distillation (:func:`distill_scales`): the paper then freezes the signs and trains only
the per-matrix scales so that the compressed model's logits match the fine-tuned model's,
``alpha* = argmin E_x |Z_fine(x) - Z_bin(x; alpha)|^2`` (MSE on logits) on a few batches of
generic text; the result is again one :class:`BitDelta` per matrix, with new scales.

Where we differ from the paper and the official code (``FasterDecoding/BitDelta``):

- ``sign(0)``: the paper writes ``-1`` for ``dW <= 0``; the official code stores ``dW >= 0`` as
  ``+1`` (``mask[diff < 0] = 0``). We follow the code; it only matters for entries that are
  exactly zero, and both cost one bit.
- The official code compresses only the attention and MLP projections (``"proj"`` in the
  name); here the codec compresses whatever tensor it is given: which tensors to compress is
  the caller's choice.
- Distillation uses Adam without weight decay (the official script: AdamW, lr 1e-4, a cosine
  schedule, 200 steps of 4 x 128 tokens of C4); weight decay would only pull the scales
  towards zero. The cosine schedule and the defaults (lr 1e-4, 200 steps) are the official ones.

>>> v = bitdelta(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.0, 2.0]]), BitDeltaConfig())
>>> v.scale, v.to_dense().tolist()
(2.0, [[2.0, -2.0, 2.0], [-2.0, 2.0, 2.0]])
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.fields import Checked
from ...taskvec import register_codec
from .._bits import pack, packed_bytes, unpack
from .._dtypes import dtype_name, dtype_of
from .._registry import CompressedValue, register_compressor
from .compeft import fp32

__all__ = ["BitDelta", "BitDeltaConfig", "bitdelta", "distill_scales"]


@register_codec("bitdelta")
class BitDelta(CompressedValue):
    """``dW = scale * signs``: ``positive`` (flat bool, one per entry) packed 1 bit each, one fp32 scale."""

    def __init__(self, positive: torch.Tensor, scale: float, shape: tuple[int, ...], dtype: torch.dtype):
        self._shape, self._dtype = tuple(int(s) for s in shape), dtype
        if positive.numel() != self.numel:
            raise ValueError(f"BitDelta: expected {self.numel} signs for shape {list(self._shape)}, "
                             f"found {positive.numel()}")
        self.positive, self.scale = positive.reshape(-1).to(torch.bool), fp32(scale)

    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``+1 / -1`` matrix, shaped like ``dW``."""
        return (self.positive.to(dtype) * 2 - 1).reshape(self._shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        work = torch.float64 if torch.float64 in (self._dtype, dtype) else torch.float32
        return (self.signs(work) * self.scale).to(dtype or self._dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"signs": pack(self.positive.to(torch.uint8).cpu(), 1),
                "scale": torch.tensor([self.scale], dtype=torch.float32)}

    def meta(self) -> dict[str, Any]:
        return {"shape": list(self._shape), "dtype": dtype_name(self._dtype)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> BitDelta:
        shape = tuple(meta["shape"])
        positive = unpack(tensors["signs"], 1, math.prod(shape)).to(torch.bool)
        return cls(positive, float(tensors["scale"].reshape(-1)[0]), shape, dtype_of(meta["dtype"]))

    def scaled(self, c: float) -> BitDelta:
        return BitDelta(self.positive, self.scale * float(c), self._shape, self._dtype)

    def with_scale(self, scale: float) -> BitDelta:
        """The same signs with another scale (what distillation produces)."""
        return BitDelta(self.positive, scale, self._shape, self._dtype)

    def norm(self) -> float:
        return abs(self.scale) * math.sqrt(self.numel)


@dataclass(frozen=True)
class BitDeltaConfig(Checked):
    """No knobs: the scale is the L2-optimal ``mean |dW|``; distillation is a separate step
    (:func:`distill_scales`) because it needs the models and data, not one tensor."""


def _plan_bits(cfg: BitDeltaConfig, shape: tuple[int, ...]) -> float:
    n = math.prod(shape)
    return (8 * packed_bytes(n, 1) + 32) / max(1, n)


@register_compressor("bitdelta", config=BitDeltaConfig, paper="https://arxiv.org/abs/2402.10193", bits=_plan_bits)
def bitdelta(dw: torch.Tensor, cfg: BitDeltaConfig) -> BitDelta:
    """one sign bit per entry and one scale mean|dW| per matrix (scales can then be distilled on data)"""
    work = torch.float64 if dw.dtype == torch.float64 else torch.float32
    x = dw.detach().to(work)
    return BitDelta(x >= 0, float(x.abs().mean()) if x.numel() else 0.0, tuple(dw.shape), dw.dtype)


# ----------------------------------------------------------------------------- scale distillation
Batch = Mapping[str, torch.Tensor] | torch.Tensor | tuple


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits`` (HF), the tensor itself, or a tuple's first item."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"distill_scales: expected model outputs with logits, found {type(out).__name__}")


def _call(model: Callable, batch: Batch, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``model`` on a batch (a dict of keyword tensors, a tensor, or a tuple of positional ones),
    with ``params`` substituted for its own when given (``torch.func.functional_call``)."""
    args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else \
        (tuple(batch), {}) if isinstance(batch, tuple) else ((batch,), {})
    if params is None:
        return _logits(model(*args, **kwargs))
    return _logits(torch.func.functional_call(model, dict(params), args, kwargs))


def _check_values(base: nn.Module, values: Mapping[str, BitDelta]) -> dict[str, torch.Tensor]:
    """The base parameters the values apply to; a missing name, a shape mismatch or a value of
    another codec is a one-line error."""
    params = dict(base.named_parameters())
    for name, v in values.items():
        if not isinstance(v, BitDelta):
            raise TypeError(f"distill_scales: expected a BitDelta value for {name!r}, found {type(v).__name__}")
        if name not in params:
            raise KeyError(f"distill_scales: expected a parameter of the base model, found {name!r}")
        if tuple(params[name].shape) != v.shape:
            raise ValueError(f"distill_scales: {name}: expected shape {list(params[name].shape)}, "
                             f"found {list(v.shape)}")
    return params


def distill_scales(base_model: nn.Module, finetuned: nn.Module | Callable[[Batch], Any],
                   values: Mapping[str, BitDelta], batches: Iterable[Batch], steps: int = 200,
                   lr: float = 1e-4) -> tuple[dict[str, BitDelta], list[float]]:
    """BitDelta's scale distillation: train only the per-matrix scales, signs frozen, so the
    compressed model's logits match the fine-tuned model's (MSE on logits, Adam, cosine schedule).

    ``base_model``: the model the deltas apply to; its parameters named in ``values`` become
    ``base + scale * signs`` (others stay as they are, so pass a model that already holds any
    fine-tuned parameters not compressed). ``finetuned``: the teacher, a model or a function of a
    batch returning its outputs. ``batches``: a few batches (dicts of keyword tensors, tensors, or
    tuples), cycled for ``steps`` steps; the teacher's logits are computed once per batch. Neither
    model is changed (not even its ``.grad``); both run in the mode they are in (``.eval()`` for
    dropout-free targets). Returns ``(values with distilled scales, the loss of every step)``.

    ``lr`` is in the units of the scales: the official 1e-4 suits LLM deltas whose ``mean |dW|``
    is around 1e-3; lower it for smaller deltas. Memory: the signs are held as dense tensors in
    the model's dtype while training (one model's worth for a fully compressed model).
    """
    batches = list(batches)
    if not batches or steps < 1 or not lr > 0:
        raise ValueError(f"distill_scales: expected batches, steps >= 1 and lr > 0, found {len(batches)} batches, "
                         f"steps={steps}, lr={lr}")
    params = _check_values(base_model, values)
    with torch.no_grad():
        targets = [_call(finetuned, b).detach().float() for b in batches]
    frozen = {n: p.detach() for n, p in params.items()}
    signs = {n: v.signs(frozen[n].dtype).to(frozen[n].device) for n, v in values.items()}
    scales = {n: nn.Parameter(torch.tensor(v.scale, dtype=torch.float32, device=frozen[n].device))
              for n, v in values.items()}
    opt = torch.optim.Adam(scales.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for step in range(steps):
        weights = {**frozen, **{n: frozen[n] + scales[n].to(frozen[n].dtype) * signs[n] for n in values}}
        i = step % len(batches)
        loss = nn.functional.mse_loss(_call(base_model, batches[i], weights).float(), targets[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return {n: v.with_scale(float(scales[n].detach())) for n, v in values.items()}, losses
