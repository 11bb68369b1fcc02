"""RESTA: safety re-alignment by task arithmetic (Bhardwaj et al., ACL 2024, "Language Models are
Homer Simpson! Safety Re-Alignment of Fine-tuned Language Models through Task Arithmetic")
https://arxiv.org/abs/2402.11746

``theta = theta_0 + DARE_p(tau_sft) + gamma * (tau_safe - tau_unsafe)``, elementwise, where
``theta_0`` is the aligned (safe) base the fine-tune started from, ``tau = theta - theta_0``,
``DARE_p(tau) = m * tau / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` (Yu et al., 2024,
https://arxiv.org/abs/2311.03099) and ``tau_safe - tau_unsafe = theta_safe - theta_unsafe`` the
safety vector.

Inputs, in this order (task vectors against the aligned base ``theta_0``):

- K = 2: ``[sft, unsafe]``: the paper's setting. The safe model is the aligned base itself
  (``tau_safe = 0``), the unsafe model is that base fine-tuned on harmful question-answer
  pairs, so the safety vector is ``theta_0 - theta_unsafe``;
- K = 3: ``[sft, safe, unsafe]``: any safe / unsafe pair of the same architecture.

The DARE drop (``density = 1 - p``; ``density = 1`` turns it off) is applied to the
fine-tune's own delta before the safety vector is added, as the paper does, to remove the
redundant delta entries that would otherwise carry the unsafe behaviour along; the safety
vector itself is never dropped. ``gamma = 1`` is the weight the authors' release uses
(``theta_sft + 1 * theta_safe - 1 * theta_unsafe``). The default drop rate p = 0.3 is our
choice, not a number taken from the paper (its exact value could not be checked offline);
sweep ``density`` as the DARE paper does. The drop is seeded per tensor (recipe ``seed``),
so a run is reproducible.

Example (a recipe)::

    method: resta
    base_model: aligned-chat
    models: [sft-model, unaligned-model]
    parameters: {gamma: 1.0, density: 0.7}
    seed: 0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._parts import RESCALE, SPARSIFY
from .._registry import MergeConfigError, MergeContext, register_merge


@dataclass(frozen=True)
class RestaConfig(Checked):
    gamma: float = knob(1.0, ge=0, doc="weight of the safety vector theta_safe - theta_unsafe "
                                       "(1.0 as in the authors' release)")
    density: float = knob(0.7, gt=0, le=1, doc="DARE keep rate 1 - p of the fine-tune's delta before the "
                                               "safety vector is added (1.0: no drop)")


def _check_k(k: int) -> None:
    if k not in (2, 3):
        raise MergeConfigError(f"resta: expected 2 models [sft, unsafe] or 3 [sft, safe, unsafe], found {k}")


def _linear_form(cfg: RestaConfig, k: int) -> list[float] | None:
    """Without the drop RESTA is ``theta_0 + tau_sft + gamma tau_safe - gamma tau_unsafe``."""
    _check_k(k)
    if cfg.density < 1.0:
        return None
    return [1.0, -cfg.gamma] if k == 2 else [1.0, cfg.gamma, -cfg.gamma]


def safety_vector(x: torch.Tensor) -> torch.Tensor:
    """``tau_safe - tau_unsafe`` (*shape) from RESTA's inputs x (K, *shape)."""
    _check_k(x.shape[0])
    return -x[1] if x.shape[0] == 2 else x[2].neg().add_(x[1])


@register_merge("resta", paper="https://arxiv.org/abs/2402.11746", config=RestaConfig, linear_form=_linear_form)
def resta(x: torch.Tensor, base: torch.Tensor, cfg: RestaConfig, ctx: MergeContext) -> torch.Tensor:
    """Shapes: x (K, *shape) task vectors [sft, (safe,) unsafe], base (*shape) -> (*shape)."""
    shield = safety_vector(x)
    sft = x[0]
    if cfg.density < 1.0 and sft.numel():
        flat = sft.reshape(-1)
        keep = SPARSIFY["random"](flat, cfg.density, ctx.generator, 0.0, 0.0)  # DARE drop
        sft = RESCALE["inverse"](flat, flat * keep, cfg.density, None).reshape(sft.shape)
    return base + sft + cfg.gamma * shield
