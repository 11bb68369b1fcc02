"""IncreLoRA: incremental rank allocation (Zhang et al., 2023) https://arxiv.org/abs/2308.12043

    W' = W + s * P diag(lambda) Q,   s = alpha / target_r
    score_k = sum |dW_k * dL/d(dW_k)| / sqrt(numel(dW_k)),  smoothed as I_bar * U_bar (AdaLoRA)

Every target starts with ``init_r`` active components (lambda = 0, P, Q ~ N(0, 0.02^2),
so the model starts at the base up to the reserve term below). Every ``deltaT`` steps
after ``tinit``, the ``top_h`` targets with the highest smoothed score gain ``incre_r``
components each, until the total rank reaches ``target_r * n``.

Advance learning (paper sec. 3.3): the next ``incre_r`` components of each target are
*reserved*: their P, Q train with lambda fixed at 1e-5, and when the target is picked
they switch on with lambda starting from 1e-5 (so the function is continuous). When
the budget is reached the reserves are switched off.

Rank growth uses pre-allocated capacity: every parameter has ``max_r`` components and an
int8 ``state`` buffer (0 off, 1 reserve, 2 on) masks them. Shapes never change, so the
optimizer and LR schedule need no new parameter groups, the file layout is fixed (the
state is saved with the factors), and merge / save / load are the generic ones. The
cost is ``max_r`` allocated rank per target instead of the current rank.
Shapes: lora_A (Q) (max_r, in), lora_E (lambda) (max_r,), lora_B (P) (out, max_r).

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> ad = dk.attach(m, dk.get_method("increlora").config(init_r=1, target_r=2, max_r=4, targets=["0"]))
>>> IncreLoRABudget(ad).total_rank()
1
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._lora_common import OFF, ON, RESERVE, SVDLoRA, load_rank_states, orthogonal_regularizer, rank_states, svd_deltas
from .lora import _cast

__all__ = ["IncreLoraConfig", "IncreLoRA", "IncreLoRABudget", "regularizer"]

#: ``regularizer(model, name=None)``: gamma * orthogonality penalty, to add to the loss
regularizer = orthogonal_regularizer


@dataclass(frozen=True)
class IncreLoraConfig(DeltaConfig):
    """IncreLoRA hyper-parameters (schedule fields are read by :class:`IncreLoRABudget`)."""

    init_r: int = knob(2, ge=1, doc="active rank of every target at the start")
    target_r: int = knob(8, ge=1, log=True, doc="average rank per target at the end (total budget target_r * n)")
    max_r: int = knob(16, ge=1, doc="allocated capacity per target (upper bound of any one target's rank)")
    incre_r: int | None = knob(
        None, ge=1, doc="components added to a picked target per round; None = max(1, target_r // 2) (the "
                        "official code's choice)")
    top_h: int = knob(2, ge=1, doc="targets picked per round")
    alpha: float = knob(8.0, gt=0, log=True, doc="scale numerator; the update is multiplied by ``alpha / target_r``")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the branch input (training only)")
    tinit: int = knob(0, ge=0, doc="warm-up steps before the first growth")
    deltaT: int = knob(10, ge=1, doc="steps between two growth rounds")
    beta1: float = knob(0.85, gt=0, lt=1, doc="EMA coefficient of the sensitivity I_bar")
    beta2: float = knob(0.85, gt=0, lt=1, doc="EMA coefficient of the uncertainty U_bar")
    advance_learning: bool = knob(True, doc="train the next components (reserves) before switching them on")
    orth_reg_weight: float = knob(0.5, ge=0, doc="gamma, weight of the orthogonality penalty in :func:`regularizer`")

    @property
    def step_r(self) -> int:
        return self.incre_r if self.incre_r is not None else max(1, self.target_r // 2)

    def validate(self) -> None:
        name = type(self).__name__
        if not self.init_r <= self.target_r <= self.max_r:
            raise ConfigError(f"{name}: expected init_r <= target_r <= max_r, found {self.init_r}, "
                              f"{self.target_r}, {self.max_r}")
        if self.advance_learning and self.init_r + self.step_r > self.max_r:
            raise ConfigError(f"{name}.max_r: expected at least init_r + incre_r = {self.init_r + self.step_r} "
                              f"(room for the reserved components), found {self.max_r}")


@register_method("increlora", IncreLoraConfig, paper="https://arxiv.org/abs/2308.12043",
                 description="SVD-form delta whose rank grows where the smoothed importance is highest")
class IncreLoRA(SVDLoRA):
    @classmethod
    def training_hooks(cls, adapter, *, loader=None, total_steps: int | None = None):
        """Rank growth runs as a callback of the training loop."""
        return None, [IncreLoRABudget(adapter)]

    reserve_value = 1e-5    # the fixed lambda of reserved components (official code)

    def __init__(self, base: nn.Module, config: IncreLoraConfig, ctx: BuildContext | None = None):
        super().__init__(base, config.max_r, config.alpha, config.dropout, config.init_r, ctx,
                         config.adapter_dtype)
        # fixed scale: a rank-dependent alpha / rank would rescale every existing
        # component each time one is added, a jump in the function mid-training
        self.scale = config.alpha / config.target_r
        if config.advance_learning:
            self.state[config.init_r: config.init_r + config.step_r] = RESERVE
        self.tracking = False                    # set by IncreLoRABudget while growing
        self.score: Tensor | None = None         # sum over backward passes since the last step

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        if not (self.tracking and torch.is_grad_enabled()):
            return super().residual(base, x)
        xd = self.dropout(_cast(x, self.lora_A))
        out = ((xd @ self.lora_A.t()) * (self.lam() * self.scale)) @ self.lora_B.t()
        if out.requires_grad:
            out.register_hook(partial(self._score_hook, xd.detach()))
        return out

    @torch.no_grad()
    def _score_hook(self, xd: Tensor, grad: Tensor) -> None:
        # out = x dW^T, so dL/d(dW) = sum over tokens of grad^T x: (out, in)
        g = grad.reshape(-1, grad.shape[-1]).float().t() @ xd.reshape(-1, xd.shape[-1]).float()
        dw = (self.lora_B * self.lam()).float() @ self.lora_A.float() * self.scale
        s = (dw * g).abs().sum() / math.sqrt(dw.numel())
        self.score = s if self.score is None else self.score + s


class IncreLoRABudget:
    """Training callback: importance scoring and rank growth for one IncreLoRA adapter.

    Call ``on_step(step, model)`` after every ``optimizer.step()`` (``step`` from 1).
    Scores come from gradient hooks during ``backward``, so the loop may clear
    gradients before calling it. Done when the total rank reaches ``target_r * n``
    (or every target is full).
    """

    def __init__(self, adapter: Adapter):
        cfg = adapter.config
        if not isinstance(cfg, IncreLoraConfig):
            raise TypeError(f"IncreLoRABudget: expected an increlora adapter, found method {adapter.spec.name!r}")
        self.config = cfg
        self.name = adapter.name
        self.deltas: dict[str, IncreLoRA] = dict(svd_deltas(adapter))  # type: ignore[arg-type]
        self.target_budget = cfg.target_r * len(self.deltas)
        self.i_bar = {p: 0.0 for p in self.deltas}
        self.u_bar = {p: 0.0 for p in self.deltas}
        self.finished = self.total_rank() >= self.target_budget
        for d in self.deltas.values():
            d.tracking = not self.finished

    def total_rank(self) -> int:
        return sum(d.rank() for d in self.deltas.values())

    def rank_pattern(self) -> dict[str, int]:
        return {p: d.rank() for p, d in self.deltas.items()}

    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs to grow as this one would: the rank pattern (``state``
        buffers, reserves included), the score EMAs and whether growth is over (the
        checkpoint protocol of :func:`deltakit.train.fit`). Between steps no backward
        score is pending (``on_step`` consumed it), so none is saved."""
        return {"finished": self.finished, "i_bar": dict(self.i_bar), "u_bar": dict(self.u_bar),
                **rank_states(self.deltas)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` into this callback and the adapter's ``state`` buffers."""
        for key in ("i_bar", "u_bar"):
            if set(state[key]) != set(self.deltas):
                raise ValueError(f"IncreLoRABudget: expected {key} of the targets {sorted(self.deltas)[:3]}..., "
                                 f"found {sorted(state[key])[:3]}...")
        load_rank_states(self.deltas, state, type(self).__name__)
        self.i_bar = {p: float(state["i_bar"][p]) for p in self.deltas}
        self.u_bar = {p: float(state["u_bar"][p]) for p in self.deltas}
        self.finished = bool(state["finished"])
        for d in self.deltas.values():
            d.tracking, d.score = not self.finished, None

    def scores(self) -> dict[str, float]:
        return {p: self.i_bar[p] * self.u_bar[p] for p in self.deltas}

    def on_step(self, step: int, model: nn.Module | None = None) -> None:
        if self.finished:
            return
        c = self.config
        for p, d in self.deltas.items():
            if d.score is None:
                continue
            i = float(d.score)
            d.score = None
            self.i_bar[p] = c.beta1 * self.i_bar[p] + (1 - c.beta1) * i
            self.u_bar[p] = c.beta2 * self.u_bar[p] + (1 - c.beta2) * abs(i - self.i_bar[p])
        if step > c.tinit and step % c.deltaT == 0:
            self.grow()

    @torch.no_grad()
    def grow(self) -> None:
        """Add ``incre_r`` components to each of the ``top_h`` best-scoring targets with room."""
        c = self.config
        left = self.target_budget - self.total_rank()
        scores = self.scores()
        room = {p: int((d.state != ON).sum()) for p, d in self.deltas.items()}
        picked = sorted((p for p in self.deltas if room[p] > 0), key=lambda p: -scores[p])[: c.top_h]
        for p in picked:
            if left <= 0:
                break
            n = min(c.step_r, left, room[p])
            self._switch_on(self.deltas[p], n)
            left -= n
        if left <= 0 or not any(int((d.state != ON).sum()) for d in self.deltas.values()):
            self.finish()

    def _switch_on(self, d: IncreLoRA, n: int) -> None:
        # reserves first (they have trained in advance), then fresh components in order
        order = torch.cat([(d.state == RESERVE).nonzero().flatten(), (d.state == OFF).nonzero().flatten()])
        on = order[:n]
        d.lora_E[on] = torch.where(d.state[on] == RESERVE, d.reserve_value, 0.0).to(d.lora_E.dtype)
        d.state[on] = ON
        if self.config.advance_learning:
            fresh = (d.state == OFF).nonzero().flatten()
            need = self.config.step_r - int((d.state == RESERVE).sum())
            if need > 0:
                d.state[fresh[:need]] = RESERVE

    def finish(self) -> None:
        """Budget reached: switch the reserves off and stop scoring."""
        for d in self.deltas.values():
            d.state[d.state == RESERVE] = OFF
            d.tracking = False
            d.score = None
        self.finished = True

    def regularizer(self, model: nn.Module) -> Tensor:
        """gamma * orthogonality penalty of this adapter (add it to the loss)."""
        return orthogonal_regularizer(model, self.name)
