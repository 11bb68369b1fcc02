"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell et al., 2022)
"Composable Sparse Fine-Tuning for Cross-Lingual Transfer", https://arxiv.org/abs/2110.07560

    phase 1: theta1 = full fine-tuning of theta0;   mu = top-K of |theta1 - theta0| (one global K)
    phase 2: reset to theta0, train only where mu = 1:   phi = mu ⊙ (theta2 - theta0)
    composition: theta0 + phi_1 + phi_2 + ...   (sparse differences add)

K is a fraction ``density`` of all the targets' parameters together (the authors'
``ft_params_proportion``, default 1%), chosen across every target at once, not per
matrix. The authors' code (https://github.com/cambridgeltl/composable-sft) keeps the model's
parameters dense and masks their gradients; here phase 2's trainable parameters are exactly
the K values (one flat vector, shared by the adapter's targets) and each target stores the
positions it got, so the file holds K values plus K int32 positions. Every parameter of each
target module (weight and bias) is maskable; modules outside the targets (e.g. a new head in
``modules_to_save``) train in full in both phases, as the authors' non-maskable parameters.

Two ways to train:

* the paper's: two runs, each with its own optimiser and learning-rate schedule::

      ad = dk.attach(model, LtSftConfig(density=0.01))   # phase 1: every target parameter trains
      fit(model, loader, ...)
      select_mask(ad)                                    # top-K |dW|; dW reset to zero
      fit(model, loader, ...)                            # phase 2: only the K values train

* one run (``deltakit train``, the benchmarks): :meth:`LtSft.training_hooks` returns an
  :class:`LtSftSchedule` callback that calls :func:`select_mask` after
  ``round(full_fraction * steps)`` steps. Phase 2's values take no gradient in phase 1, so
  their AdamW state is fresh when it starts (as with a new optimiser); the one difference
  from the paper is that the learning-rate schedule spans both phases instead of restarting.

The authors' optional L1 pull towards theta0 (``full_l1_reg`` / ``sparse_l1_reg``) is
:func:`l1_penalty` (add ``coefficient * l1_penalty(ad)`` to the loss). Their multi-iteration
variant (``n_ft_iterations > 1``) is not implemented; its default and the paper's runs use one.

>>> import torch, deltakit as dk
>>> from deltakit.methods.lt_sft import LtSftConfig, select_mask
>>> m = torch.nn.Sequential(torch.nn.Linear(10, 10))
>>> ad = dk.attach(m, LtSftConfig(density=0.05, targets=["0"]))
>>> with torch.no_grad():
...     _ = m[0].deltas["default"].full["weight"].normal_()
>>> select_mask(ad)                 # K = round(0.05 * (100 + 10))
>>> ad.num_parameters(trainable_only=True)
6
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.layer import DeltaStateError
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._base_ops import Conv1D, device_of
from ._sparse_common import ALL_LINEAR, top_k

__all__ = ["LtSftConfig", "LtSft", "LtSftSchedule", "select_mask", "l1_penalty", "num_tuned"]


@dataclass(frozen=True)
class LtSftConfig(DeltaConfig):
    """LT-SFT hyper-parameters."""

    density: float = knob(0.01, gt=0, le=1, log=True,
                          doc="K as a fraction of all target parameters together (the authors' ft_params_proportion)")
    full_fraction: float = knob(0.5, gt=0, lt=1, doc="share of the steps spent in phase 1 (full fine-tuning) when "
                                                     "both phases run in one training run (equal phases in the paper)")


def num_tuned(total: int, density: float) -> int:
    """K: how many of ``total`` maskable parameters phase 2 trains (at least one)."""
    return max(1, round(density * total))


class _Values(nn.Module):
    """The K phase-2 values, one flat vector for all of an adapter's targets."""

    def __init__(self, k: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))


@register_method("lt_sft", LtSftConfig, paper="https://arxiv.org/abs/2110.07560",
                 description="LT-SFT: full fine-tune, keep the top-K most changed parameters, reset and train "
                             "only those (sparse deltas compose by addition)")
class LtSft(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)
    default_targets = ALL_LINEAR

    @classmethod
    def build_shared(cls, config: LtSftConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        mods = list(targets.values())
        total = sum(p.numel() for m in mods for p in m.parameters(recurse=False))
        return _Values(num_tuned(total, config.density), param_dtype(mods[0], config.adapter_dtype),
                       device_of(mods[0]))

    def __init__(self, base: nn.Module, config: LtSftConfig, ctx: BuildContext):
        super().__init__()
        object.__setattr__(self, "_shared", ctx.shared)   # the K values live once, on the model
        dtype = param_dtype(base, config.adapter_dtype)
        own = dict(base.named_parameters(recurse=False))
        self.shapes = {n: tuple(p.shape) for n, p in own.items()}
        self.numel = sum(p.numel() for p in own.values())
        self.full = nn.ParameterDict({n: nn.Parameter(torch.zeros_like(p, dtype=dtype)) for n, p in own.items()})
        idx_dtype = torch.int32 if self.numel < 2**31 else torch.int64
        self.register_buffer("indices", torch.zeros(0, dtype=idx_dtype, device=device_of(base)))   # (k_t,)
        self.register_buffer("offset", torch.zeros((), dtype=torch.long))   # where k_t starts in the K values

    @property
    def phase(self) -> int:
        """1 while every target parameter trains in full, 2 once :func:`select_mask` chose the mask."""
        return 1 if len(self.full) else 2

    def flat_full(self) -> Tensor:
        """Phase 1's ``dW`` of every parameter of the target, flattened and concatenated (numel,)."""
        if self.phase != 1:
            raise DeltaStateError("lt_sft: the mask is already chosen (phase 2); phase 1's dense dW is gone")
        return torch.cat([self.full[n].reshape(-1) for n in self.shapes])

    def sparse_values(self) -> Tensor:
        start = int(self.offset)
        return self._shared.values[start: start + self.indices.numel()]

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.phase == 1:
            return {n: p for n, p in self.full.items()}
        vals = self.sparse_values()
        flat = vals.new_zeros(self.numel).index_put((self.indices.long(),), vals)
        out, at = {}, 0
        for n, shape in self.shapes.items():
            size = 1
            for s in shape:
                size *= s
            out[n] = flat[at: at + size].view(shape)
            at += size
        return out

    @torch.no_grad()
    def enter_phase2(self, indices: Tensor, offset: int) -> None:
        """Keep only ``indices`` (flat positions in this target's parameters), trained from zero."""
        for p in self.full.values():
            p.requires_grad_(False)   # an optimiser still holding it skips it (its grad stays None)
        self.full = nn.ParameterDict()
        self.indices = indices.to(device=self.indices.device, dtype=self.indices.dtype)
        self.offset.fill_(offset)

    def adopt_state(self, state: Mapping[str, Tensor]) -> None:
        """A file written in phase 2 has no dense part and ``k_t`` positions: take that shape."""
        if "indices" in state and not any(k.startswith("full.") for k in state):
            self.full = nn.ParameterDict()
            self.indices = torch.empty_like(state["indices"], device=self.indices.device)

    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """One run: phase 1 for ``round(full_fraction * total_steps)`` steps, then the mask."""
        if total_steps is None:
            raise ConfigError("lt_sft: expected the number of training steps (to place the mask selection), "
                              "found none")
        return None, [LtSftSchedule(adapter, max(1, round(adapter.config.full_fraction * total_steps)))]

    @classmethod
    def contract_config(cls, kind: str) -> None:
        # phase 2 needs a phase-1 run first; tests/methods/test_lt_sft.py runs the contract on both phases
        return None


def _deltas(adapter: Adapter) -> dict[str, LtSft]:
    if adapter.spec.name != "lt_sft":
        raise ConfigError(f"lt_sft: expected an 'lt_sft' adapter, found method {adapter.spec.name!r}")
    return {p: d for p, d in adapter.deltas()}  # type: ignore[misc]


def select_mask(adapter: Adapter) -> None:
    """End phase 1: keep the K parameters that changed most (``|theta1 - theta0|``, over every
    target together; ties: the earliest position), reset every delta to zero and train only those."""
    deltas = _deltas(adapter)
    if any(d.phase != 1 for d in deltas.values()):
        raise DeltaStateError("lt_sft: the mask is already chosen")
    if adapter.merged:
        raise DeltaStateError("lt_sft: unmerge the adapter before choosing its mask")
    k = adapter.shared.values.numel()
    scores = torch.cat([d.flat_full().detach().abs().float().cpu() for d in deltas.values()])
    chosen = top_k(scores, k)                                   # sorted global positions (K,)
    start = 0
    for d in deltas.values():
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + d.numel]))
        d.enter_phase2(chosen[lo:hi] - start, int(lo))
        start += d.numel
    with torch.no_grad():
        adapter.shared.values.zero_()


def l1_penalty(adapter: Adapter) -> Tensor:
    """``sum |dW| / N`` over the adapter's maskable parameters (N of them): the authors' L1 pull
    towards the pretrained values (``full_l1_reg`` in phase 1, ``sparse_l1_reg`` in phase 2).
    Differentiable; multiply by the coefficient yourself."""
    deltas = _deltas(adapter)
    n = sum(d.numel for d in deltas.values())
    if all(d.phase == 2 for d in deltas.values()):
        return adapter.shared.values.abs().sum() / n
    return sum(d.flat_full().abs().sum() for d in deltas.values()) / n


class LtSftSchedule:
    """Training callback for one-run LT-SFT: :func:`select_mask` after ``switch_step`` steps.

    Stateful for resumes: once switched, its state holds every target's positions, and
    restoring it puts a freshly attached adapter in phase 2 with that mask."""

    def __init__(self, adapter: Adapter, switch_step: int):
        self.adapter, self.switch_step = adapter, switch_step
        _deltas(adapter)

    @property
    def switched(self) -> bool:
        return all(d.phase == 2 for d in _deltas(self.adapter).values())

    def on_step(self, step: int, model: nn.Module | None = None) -> None:
        if step >= self.switch_step and not self.switched:
            select_mask(self.adapter)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"switched": self.switched}
        if out["switched"]:
            for p, d in _deltas(self.adapter).items():
                out[f"indices.{p}"] = d.indices.clone()
                out[f"offset.{p}"] = int(d.offset)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state["switched"] or self.switched:
            return
        for p, d in _deltas(self.adapter).items():
            d.enter_phase2(state[f"indices.{p}"], int(state[f"offset.{p}"]))
