"""SPT: Sensitivity-aware Parameter-efficient fine-Tuning (He et al., 2023)
"Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2303.08566

    s_n = sum_b (dL_b / dw_n)^2             (sensitivity, on a few batches of the task's data)
    S = the top-tau s_n over every target parameter together;  sigma_W = |S ∩ W|
    a weight matrix W (out, in):  sigma_W >= r (in + out) / alpha  ->  LoRA of rank r on W
                                  otherwise                         ->  tune exactly S ∩ W
    a bias b:                     sigma_b >= len(b) / beta          ->  tune b whole, else S ∩ b
    tau: the largest whose total trainable count fits the budget

Sensitivity is the authors' (https://github.com/ziplab/SPT, ``get_sensitivity``): squared
gradients of the base summed over ``calibration_batches`` batches (8), through the library's
one gradient-statistics hook (:func:`deltakit.core.stats.estimate_fisher`). The authors sweep
tau in steps and keep the configuration whose count is *closest* to the budget; we bisect for
the largest tau whose count does not exceed it (the cost is non-decreasing in tau), so the
budget is a bound. The authors' structured alternative may be LoRA or an adapter; this is
the LoRA variant (``r = 8``, ``alpha = 10`` in their LoRA configs). Targets are the modules'
weights and biases (the authors also allocate LayerNorm vectors; attach those modules'
parameters with another method if wanted).

The allocation needs data, so attach, then :func:`calibrate` before training (``deltakit
train`` does it from the first batches)::

    ad = dk.attach(model, SptConfig(budget=0.01))
    calibrate(ad, batches)            # loss_fn(model, batch) defaults to model(**batch).loss

Until calibrated the adapter has no trainable parameters and refuses to compute. LoRA's B
starts at zero and the sparse values at zero, so the adapted model starts equal to the base.

>>> import torch, deltakit as dk
>>> from deltakit.methods.spt import SptConfig, calibrate
>>> m = torch.nn.Sequential(torch.nn.Linear(16, 16))
>>> ad = dk.attach(m, SptConfig(budget=0.02, targets=["0"]))
>>> _ = calibrate(ad, [torch.randn(4, 16)], lambda mod, x: mod(x).pow(2).sum())
>>> ad.num_parameters(trainable_only=True) <= round(0.02 * (16 * 16 + 16))
True
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, disabled
from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.layer import DeltaStateError
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.stats import estimate_fisher, first_batches
from ._base_ops import Conv1D, device_of, in_out
from ._sparse_common import ALL_LINEAR

__all__ = ["SptConfig", "Spt", "Plan", "allocate", "calibrate"]


@dataclass(frozen=True)
class SptConfig(DeltaConfig):
    """SPT hyper-parameters."""

    budget: float = knob(0.01, gt=0, le=1, log=True,
                         doc="trainable parameters as a fraction of all target parameters (weights and biases)")
    r: int = knob(8, ge=1, log=True, doc="rank of the LoRA that tunes a matrix with many sensitive entries")
    alpha: float = knob(8.0, gt=0, log=True, doc="LoRA scale numerator (the update is multiplied by alpha / r)")
    structured_ratio: float = knob(10.0, gt=0, log=True,
                                   doc="SPT's alpha: a matrix gets LoRA once it has r (in + out) / ratio sensitive "
                                       "entries (10 in the authors' LoRA runs)")
    vector_ratio: float = knob(5.0, gt=0, log=True,
                               doc="SPT's beta: a bias is tuned whole once len / ratio of it is sensitive")
    calibration_batches: int = knob(8, ge=1, doc="training batches whose squared gradients give the sensitivity")


class Plan(NamedTuple):
    """One target's allocation: LoRA on the weight or not, and the flat positions (in the
    concatenated [weight, bias] of the module) tuned one by one."""

    structured: bool
    indices: Tensor


def _segments(sizes: Mapping[str, tuple[int, int, int]]) -> list[tuple[str, str, int]]:
    """(target, "w" | "b", length) in the order scores are concatenated."""
    out = []
    for p, (nw, nb, _) in sizes.items():
        out.append((p, "w", nw))
        if nb:
            out.append((p, "b", nb))
    return out


def _cost(counts: Tensor, segs: list, sizes: Mapping[str, tuple[int, int, int]], cfg: SptConfig) -> int:
    total = 0
    for c, (p, kind, n) in zip(counts.tolist(), segs):
        if kind == "w":
            lora = sizes[p][2]
            total += lora if c >= lora / cfg.structured_ratio else c
        else:
            total += n if c >= n / cfg.vector_ratio else c
    return total


def allocate(scores: Mapping[str, tuple[Tensor, Tensor | None]], cfg: SptConfig,
             lora_sizes: Mapping[str, int]) -> dict[str, Plan]:
    """SPT's allocation from per-target sensitivities ``(weight scores, bias scores or None)``
    and each weight's LoRA cost ``r (in + out)``: the largest tau whose cost fits
    ``round(budget * N)`` (ties in sensitivity: the earliest position)."""
    sizes = {p: (w.numel(), 0 if b is None else b.numel(), lora_sizes[p]) for p, (w, b) in scores.items()}
    segs = _segments(sizes)
    flat = torch.cat([t.detach().flatten().float() for w, b in scores.values() for t in (w, b) if t is not None])
    seg_id = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor([n for _, _, n in segs]))
    order = torch.sort(flat, descending=True, stable=True).indices
    limit = max(1, round(cfg.budget * flat.numel()))

    def counts(tau: int) -> Tensor:
        return torch.bincount(seg_id[order[:tau]], minlength=len(segs))

    lo, hi = 0, flat.numel()                 # cost(lo) <= limit; find the largest such tau
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _cost(counts(mid), segs, sizes, cfg) <= limit:
            lo = mid
        else:
            hi = mid - 1
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:lo]] = True
    return _plans(chosen, counts(lo), segs, sizes, cfg)


def _plans(chosen: Tensor, counts: Tensor, segs: list, sizes: Mapping[str, tuple[int, int, int]],
           cfg: SptConfig) -> dict[str, Plan]:
    plans: dict[str, Plan] = {}
    at = 0
    for c, (p, kind, n) in zip(counts.tolist(), segs):
        part = chosen[at: at + n]
        at += n
        base = 0 if kind == "w" else sizes[p][0]          # bias positions follow the weight's
        structured, idx = plans.get(p, Plan(False, torch.zeros(0, dtype=torch.long)))
        if kind == "w":
            structured = c >= sizes[p][2] / cfg.structured_ratio
            new = torch.zeros(0, dtype=torch.long) if structured else part.nonzero().flatten()
        else:
            new = torch.arange(n) if c >= n / cfg.vector_ratio else part.nonzero().flatten()
        plans[p] = Plan(structured, torch.cat([idx, new + base]))
    return plans


@register_method("spt", SptConfig, paper="https://arxiv.org/abs/2303.08566",
                 description="SPT: gradient sensitivity on data; LoRA on matrices with many sensitive entries, "
                             "the sensitive entries alone elsewhere, within a parameter budget")
class Spt(WeightDelta):
    supported = (nn.Linear, Conv1D)
    default_targets = ALL_LINEAR
    weight_dependent = False

    def __init__(self, base: nn.Module, config: SptConfig, ctx: BuildContext | None = None):
        super().__init__()
        w, b = base.weight, base.bias
        self.fan_in, self.fan_out = in_out(base)
        self.conv1d = isinstance(base, Conv1D)
        self.w_shape = tuple(w.shape)
        self.b_shape = None if b is None else tuple(b.shape)
        self.numel = w.numel() + (0 if b is None else b.numel())
        self.r, self.scale = config.r, config.alpha / config.r
        self._dtype, dev = param_dtype(base, config.adapter_dtype), device_of(base)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.values = nn.Parameter(torch.zeros(0, dtype=self._dtype, device=dev))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int64, device=dev))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=dev))
        self._ready = False    # python mirror of `calibrated`: no device sync per forward

    def lora_cost(self) -> int:
        return self.r * (self.fan_in + self.fan_out)

    def _make_lora(self) -> None:
        dev = self.values.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.fan_in, dtype=self._dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.fan_out, self.r, dtype=self._dtype, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as LoRA (B = 0, so dW = 0)

    @torch.no_grad()
    def set_plan(self, plan: Plan) -> None:
        """Take the allocation: LoRA on the weight or not, and the positions tuned one by one."""
        if self._ready:
            raise DeltaStateError("spt: already calibrated (re-allocating would discard the trained parameters)")
        if plan.structured:
            self._make_lora()
        self.indices = plan.indices.to(device=self.indices.device, dtype=torch.int64)
        self.values = nn.Parameter(torch.zeros(plan.indices.numel(), dtype=self._dtype, device=self.values.device))
        self.calibrated.fill_(True)
        self._ready = True

    def adopt_state(self, state: Mapping[str, Tensor]) -> None:
        """The allocation was chosen from data: take its shapes from the saved state."""
        if "lora_A" in state:
            self._make_lora()
        if "indices" in state:
            self.indices = torch.empty_like(state["indices"], device=self.indices.device)
            self.values = nn.Parameter(torch.zeros(state["indices"].numel(), dtype=self._dtype,
                                                   device=self.values.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.calibrated)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self._ready:
            raise DeltaStateError("spt: the adapter is not calibrated yet; call "
                                  "deltakit.methods.spt.calibrate(adapter, batches) first")
        v = self.values.float()
        flat = v.new_zeros(self.numel).index_put((self.indices,), v)
        nw = self.numel - (0 if self.b_shape is None else math.prod(self.b_shape))
        dw = flat[:nw].view(self.w_shape)
        if self.lora_A is not None:
            prod = (self.lora_B.float() @ self.lora_A.float()) * self.scale     # (out, in)
            dw = dw + (prod.t() if self.conv1d else prod)
        out = {"weight": dw}
        if self.b_shape is not None:
            out["bias"] = flat[nw:].view(self.b_shape)
        return out

    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """The allocation comes from gradients on the first ``calibration_batches`` training batches."""
        calibrate(adapter, first_batches(adapter.model, loader, adapter.config.calibration_batches,
                                         method="spt", purpose="measure parameter sensitivity"))
        return None, []

    @classmethod
    def contract_config(cls, kind: str) -> None:
        # needs data (calibrate) before it has any parameter; tests/methods/test_spt.py runs the contract
        return None


def _sensitivity(adapter: Adapter, layers: Mapping[str, Any], batches: Iterable[Any],
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Squared gradients of every target's base weight and bias (every adapter disabled)."""
    model = adapter.model
    names = {id(p): n for n, p in model.named_parameters()}
    own = {p: [t for t in (layer.base.weight, layer.base.bias) if t is not None] for p, layer in layers.items()}
    flags = {id(t): t.requires_grad for ts in own.values() for t in ts}
    try:
        for ts in own.values():
            for t in ts:
                t.requires_grad_(True)
        with disabled(model):
            kw = {} if loss_fn is None else {"loss_fn": loss_fn}
            fisher = estimate_fisher(model, batches, names=[names[id(t)] for ts in own.values() for t in ts], **kw)
    finally:
        for ts in own.values():
            for t in ts:
                t.requires_grad_(flags[id(t)])
    out = {}
    for p, layer in layers.items():
        b = layer.base.bias
        out[p] = (fisher[names[id(layer.base.weight)]], None if b is None else fisher[names[id(b)]])
    return out


def calibrate(adapter: Adapter, batches: Iterable[Any],
              loss_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> dict[str, Plan]:
    """Measure sensitivity on ``batches`` and allocate the budget; returns the plan per target.

    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss`` (``model(batch)`` for a tensor).
    The base's ``requires_grad`` flags are restored and its gradients cleared afterwards."""
    if adapter.spec.name != "spt":
        raise ConfigError(f"spt: expected an 'spt' adapter, found method {adapter.spec.name!r}")
    layers = dict(adapter.layers())
    if any(layer.merged for layer in layers.values()):
        raise DeltaStateError("spt: unmerge the model's adapters first (the base weights must be original)")
    scores = _sensitivity(adapter, layers, batches, loss_fn)
    deltas = {p: layer.deltas[adapter.name] for p, layer in layers.items()}
    plans = allocate(scores, adapter.config, {p: d.lora_cost() for p, d in deltas.items()})
    for p, d in deltas.items():
        d.set_plan(plans[p])
    return plans
