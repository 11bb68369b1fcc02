"""LCSC: linear combination of saved checkpoints (Liu et al., 2024, "Linear Combination of Saved
Checkpoints makes Consistency and Diffusion Models Better") https://arxiv.org/abs/2404.02241

``theta = sum_i alpha_i theta_{n_i}`` over K checkpoints of ONE training run, with
``sum_i alpha_i = 1`` and alphas free in sign (not a convex average: EMA and uniform
averaging are special cases). Shapes: theta (K, *shape) -> (*shape).

This method applies given coefficients (a recipe holds them, one ``weight`` per checkpoint);
:func:`deltakit.merge.lcsc_search` finds them by evolutionary search (Optuna's CMA-ES through
:func:`deltakit.merge.evolve_coefficients`) on any metric. Default: the uniform average.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._parts import per_model
from .._registry import MergeConfigError, MergeContext, register_merge


@dataclass(frozen=True)
class LcscConfig(Checked):
    weights: tuple[float, ...] | None = knob(
        None, per_model=True, doc="alpha_i per checkpoint, any sign, summing to 1 (default 1/K each)")


def coefficients(cfg: LcscConfig, k: int) -> list[float]:
    """[alpha_1..alpha_K]; a sum other than 1 is an error (the paper's constraint: the combination
    stays an affine point of the run, so the weights' scale is kept)."""
    alpha = per_model(cfg.weights, k, 1.0 / k, "weights")
    total = sum(alpha)
    if abs(total - 1.0) > 1e-6:
        raise MergeConfigError(f"lcsc: weights: expected a sum of 1, found {total:.6g} ({alpha})")
    return alpha


@register_merge("lcsc", paper="https://arxiv.org/abs/2404.02241", config=LcscConfig, inputs="weights",
                linear_form=coefficients)
def lcsc(x: torch.Tensor, base: torch.Tensor, cfg: LcscConfig, ctx: MergeContext) -> torch.Tensor:
    coef = torch.tensor(coefficients(cfg, x.shape[0]), dtype=x.dtype)
    return (coef @ x.reshape(x.shape[0], -1)).reshape(x.shape[1:])
