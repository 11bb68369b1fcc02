"""C-LoRA: continually self-regularised LoRA (Smith et al., 2023)
"Continual Diffusion: Continual Customization of Text-to-Image Diffusion with C-LoRA",
https://arxiv.org/abs/2304.06027

    task t:  W_t = W_0 + sum_{t' < t} s B_t' A_t'  (frozen)  +  s B_t A_t  (trained)
    L = L_task + lambda * sum_targets || (sum_{t' < t} s B_t' A_t') ⊙ (s B_t A_t) ||_F^2

Each task gets its own LoRA (this method, LoRA's parametrisation and initialisation:
``r (in + out)`` parameters per target, B = 0); the earlier tasks' LoRAs stay attached, frozen
and active, so their updates add up. The regulariser penalises the new update wherever the
earlier ones already changed the weight (an element-wise product, so it is zero on untouched
entries and lets the new task use them freely). ``lambda`` is the config's ``forget_weight``.

The penalty needs the earlier tasks' updates, which live in other adapters, so it is a loss
term built from them, not part of this delta's forward::

    prev = [dk.load_adapter(model, p, name=f"task{i}", trainable=False) for i, p in enumerate(paths)]
    ad = dk.attach(model, CLoraConfig(r=8), name="task3")
    dk.set_active(model, [a.name for a in prev] + [ad.name])
    penalty = ForgetPenalty(ad, prev)
    fit(model, loader, loss_fn=lambda m, b: m(**b).loss + penalty())

:func:`deltakit.library.continual.continue_from_library` does the loading from an
:class:`~deltakit.library.AdapterLibrary`. With no earlier task (the first one, or
``deltakit train``) the penalty is zero and C-LoRA trains as LoRA. Deliberate difference: the
paper also learns new token embeddings per concept for its diffusion prompts; that part is
prompt tuning, not C-LoRA's regulariser, and is not included. The paper tunes lambda per
setting; the default here (1.0) is a starting point, not its value.

>>> import torch, deltakit as dk
>>> lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(lin, dk.get_method("c_lora").config(r=2, targets=["0"]))
>>> ad.num_parameters(trainable_only=True)   # r * (in + out), as LoRA
24
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.adapter import Adapter
from ..core.fields import knob
from ..core.registry import ConfigError, register_method
from .lora import LoRA, LoraConfig

__all__ = ["CLoraConfig", "CLoRA", "ForgetPenalty"]


@dataclass(frozen=True)
class CLoraConfig(LoraConfig):
    """C-LoRA hyper-parameters: LoRA's (``r``, ``alpha``, ``dropout``, ...) plus the penalty's weight."""

    method: ClassVar[str] = ""

    forget_weight: float = knob(1.0, ge=0, doc="lambda: weight of the penalty on overlap with earlier tasks' "
                                               "updates, ||(sum of earlier dW) ⊙ dW||^2 per target")


@register_method("c_lora", CLoraConfig, paper="https://arxiv.org/abs/2304.06027",
                 description="continual LoRA: one LoRA per task, earlier ones frozen, penalising overlap with "
                             "their updates")
class CLoRA(LoRA):
    """LoRA itself (forward, merge, batched paths); what makes it C-LoRA is :class:`ForgetPenalty`."""


class ForgetPenalty:
    """``lambda * sum_t ||P_t ⊙ dW_t||_F^2`` for a C-LoRA adapter, ``P_t`` the summed updates of
    the ``previous`` adapters on target ``t`` (fixed when the penalty is built; targets that no
    earlier adapter touches contribute nothing). Call it for the differentiable value."""

    def __init__(self, adapter: Adapter, previous: Iterable[Adapter]):
        if adapter.spec.name != "c_lora":
            raise ConfigError(f"ForgetPenalty: expected a 'c_lora' adapter, found method {adapter.spec.name!r}")
        self.adapter, self.weight = adapter, adapter.config.forget_weight
        self.past: dict[str, Tensor] = {}
        for prev in previous:
            if prev.name == adapter.name:
                raise ConfigError(f"ForgetPenalty: adapter {adapter.name!r} cannot be its own earlier task")
            with torch.no_grad():
                for key, dw in prev.delta_weights():
                    dw = dw.detach().float()
                    self.past[key] = self.past[key] + dw if key in self.past else dw.clone()
        ours = {f"{p}.weight" for p, _ in adapter.deltas()}
        # the squared mask is all the penalty ever uses; keep only what overlaps our targets
        self.past_sq = {k: v.pow(2) for k, v in self.past.items() if k in ours}

    def __call__(self) -> Tensor:
        total = None
        for path, d in self.adapter.deltas():
            p2 = self.past_sq.get(f"{path}.weight")
            if p2 is None:
                continue
            dw = d.product().float()                     # s B A in the weight's layout
            term = (p2.to(dw.device) * dw.pow(2)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=next(self.adapter.parameters()).device)
        return self.weight * total
