"""AdaLoRA: adaptive budget allocation by SVD-form pruning (Zhang et al., 2023)
https://arxiv.org/abs/2303.10512

    W' = W + s * P diag(lambda) Q,   s = alpha / init_r
    loss += gamma * sum_k ||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2        (:func:`regularizer`)

Shapes: Q = lora_A (init_r, in), lambda = lora_E (init_r,), P = lora_B (out, init_r),
state (init_r,) int8 (2 = kept, 0 = pruned; saved, so the file records the rank
pattern). lambda starts at zero (the model starts at the base), P, Q ~ N(0, 0.02^2).

Training: :class:`AdaLoRABudget` is a callback (``on_step(step, model)`` after each
optimizer step). Each step it smooths the sensitivity ``|w * dL/dw|`` of every P, lambda,
Q entry into ``I_bar * U_bar`` (eqs. 8-10), scores each triplet
``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` (eq. 11) and, every ``deltaT``
steps, keeps the top-``b(t)`` triplets over all targets, zeroing the rest of lambda
(eq. 12). The total budget follows eq. 13: ``b0 = init_r * n`` for ``tinit`` steps,
cubic decrease to ``bT = target_r * n`` at ``total_step - tfinal``, then fixed.
Pruned triplets are masked in forward (state buffer), so they get no gradient.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> cfg = dk.get_method("adalora").config(init_r=4, target_r=2, total_step=10, targets=["0"])
>>> ad = dk.attach(m, cfg)
>>> budget = AdaLoRABudget(ad)
>>> budget.budget(10)
(2, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._lora_common import (ON, OFF, Sensitivity, SVDLoRA, load_rank_states, orthogonal_regularizer, rank_states,
                           svd_deltas)

__all__ = ["AdaLoraConfig", "AdaLoRA", "AdaLoRABudget", "regularizer"]

#: ``regularizer(model, name=None)``: gamma * orthogonality penalty, to add to the loss
regularizer = orthogonal_regularizer


@dataclass(frozen=True)
class AdaLoraConfig(DeltaConfig):
    """AdaLoRA hyper-parameters (schedule fields are read by :class:`AdaLoRABudget`)."""

    init_r: int = knob(12, ge=1, log=True, doc="initial rank of every target (allocated size)")
    target_r: int = knob(
        8, ge=1, log=True, doc="average rank per target after the schedule (total budget target_r * n)")
    alpha: float = knob(12.0, gt=0, log=True, doc="scale numerator; the update is multiplied by ``alpha / init_r``")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the branch input (training only)")
    tinit: int = knob(0, ge=0, doc="steps of initial warm-up at the full budget")
    tfinal: int = knob(0, ge=0, doc="final steps with the budget fixed at target_r * n")
    deltaT: int = knob(1, ge=1, doc="steps between two budget re-allocations")
    beta1: float = knob(0.85, gt=0, lt=1, doc="EMA coefficient of the sensitivity I_bar")
    beta2: float = knob(0.85, gt=0, lt=1, doc="EMA coefficient of the uncertainty U_bar")
    orth_reg_weight: float = knob(0.5, ge=0, doc="gamma, weight of the orthogonality penalty in :func:`regularizer`")
    total_step: int | None = knob(
        None, ge=1, doc="number of optimizer steps of the run (may be given to the callback instead)")

    def validate(self) -> None:
        name = type(self).__name__
        if self.target_r > self.init_r:
            raise ConfigError(f"{name}.target_r: expected at most init_r = {self.init_r}, found {self.target_r}")
        if self.total_step is not None and self.total_step <= self.tinit + self.tfinal:
            raise ConfigError(f"{name}.total_step: expected more than tinit + tfinal = "
                              f"{self.tinit + self.tfinal}, found {self.total_step}")


@register_method("adalora", AdaLoraConfig, paper="https://arxiv.org/abs/2303.10512",
                 description="SVD-form P diag(lambda) Q, triplets pruned by smoothed sensitivity to a rank budget")
class AdaLoRA(SVDLoRA):
    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """The rank budget runs as a callback of the training loop."""
        return None, [AdaLoRABudget(adapter, total_step=adapter.config.total_step or total_steps)]

    def __init__(self, base: nn.Module, config: AdaLoraConfig, ctx: BuildContext | None = None):
        super().__init__(base, config.init_r, config.alpha, config.dropout, config.init_r, ctx,
                         config.adapter_dtype)


class AdaLoRABudget:
    """Training callback: sensitivity scoring and budget pruning for one AdaLoRA adapter.

    Create it after attaching (it hooks the adapter's parameters) and call
    ``on_step(step, model)`` after every ``optimizer.step()`` with ``step`` counting
    from 1. Gradients are captured by hooks during ``backward``, so it does not matter
    whether the loop clears them before calling ``on_step``.
    """

    def __init__(self, adapter: Adapter, total_step: int | None = None):
        cfg = adapter.config
        if not isinstance(cfg, AdaLoraConfig):
            raise TypeError(f"AdaLoRABudget: expected an adalora adapter, found method {adapter.spec.name!r}")
        total = total_step if total_step is not None else cfg.total_step
        if total is None or total <= cfg.tinit + cfg.tfinal:
            raise ConfigError(f"AdaLoRABudget.total_step: expected more than tinit + tfinal = "
                              f"{cfg.tinit + cfg.tfinal}, found {total!r}")
        self.config = cfg
        self.name = adapter.name
        self.total_step = total
        self.deltas: dict[str, SVDLoRA] = dict(svd_deltas(adapter))
        self.init_budget = cfg.init_r * len(self.deltas)
        self.target_budget = cfg.target_r * len(self.deltas)
        self.sensitivity = Sensitivity(
            {f"{p}.{k}": getattr(d, k) for p, d in self.deltas.items() for k in ("lora_A", "lora_E", "lora_B")},
            cfg.beta1, cfg.beta2)
        self.finished = False

    def budget(self, step: int) -> tuple[int, bool]:
        """``(b(t), whether to re-allocate at this step)`` (eq. 13)."""
        c, T = self.config, self.total_step
        if step <= c.tinit:
            return self.init_budget, False
        if step >= T - c.tfinal:
            return self.target_budget, True
        left = 1.0 - (step - c.tinit) / (T - c.tfinal - c.tinit)
        b = self.target_budget + (self.init_budget - self.target_budget) * left ** 3
        return int(b), step % c.deltaT == 0

    def triplet_scores(self) -> dict[str, Tensor]:
        """``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` per target, (init_r,) each."""
        s = self.sensitivity.score
        return {p: s(f"{p}.lora_E") + s(f"{p}.lora_B").mean(0) + s(f"{p}.lora_A").mean(1)
                for p in self.deltas}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` highest-scoring triplets over all targets; zero lambda of the rest."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[p].to(d.lora_E.device).float() for p, d in self.deltas.items()])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        i = 0
        for d in self.deltas.values():
            k = keep[i: i + d.r]
            i += d.r
            d.lora_E[~k] = 0.0                      # eq. 12: pruned singular values are zeroed
            d.state.copy_(torch.where(k, ON, OFF).to(d.state.dtype))

    def on_step(self, step: int, model: nn.Module | None = None) -> None:
        self.sensitivity.update()
        with torch.no_grad():
            # the optimizer's momentum can move masked entries; keep pruned lambda at zero
            # (eq. 12 applies every step; the forward masks them regardless)
            for d in self.deltas.values():
                d.lora_E[d.state == OFF] = 0.0
        if self.finished:
            return
        b, realloc = self.budget(step)
        if realloc:
            self.mask_to_budget(b)
        if step >= self.total_step - self.config.tfinal:
            self.finished = True                    # budget fixed; stop scoring
            self.sensitivity.close()

    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs to prune as this one would: the rank pattern (``state``
        buffers), the sensitivity EMAs and whether the budget is fixed (tensors and JSON values,
        the checkpoint protocol of :func:`deltakit.train.fit`)."""
        return {"finished": self.finished, **rank_states(self.deltas),
                **{f"sensitivity/{k}": t for k, t in self.sensitivity.state_dict().items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` into this callback and the adapter's ``state`` buffers."""
        load_rank_states(self.deltas, state, type(self).__name__)
        prefix = "sensitivity/"
        self.sensitivity.load_state_dict({k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)})
        self.finished = bool(state["finished"])
        if self.finished:
            self.sensitivity.close()                # as on_step does when the budget becomes fixed

    def total_rank(self) -> int:
        return sum(d.rank() for d in self.deltas.values())

    def rank_pattern(self) -> dict[str, int]:
        return {p: d.rank() for p, d in self.deltas.items()}

    def regularizer(self, model: nn.Module) -> Tensor:
        """gamma * orthogonality penalty of this adapter (add it to the loss)."""
        return orthogonal_regularizer(model, self.name)
