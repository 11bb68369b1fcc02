"""SLERP (Shoemake, 1985; as used for model merging by mergekit) https://en.wikipedia.org/wiki/Slerp

Between the base theta_0 and one model theta_1, on the whole flattened tensor:
``cos(Omega) = <theta_0/|theta_0|, theta_1/|theta_1|>``,
``theta = sin((1-t) Omega)/sin(Omega) theta_0 + sin(t Omega)/sin(Omega) theta_1``,
falling back to linear interpolation when |cos(Omega)| > dot_threshold (nearly collinear).
Shapes: theta (1, *shape), base (*shape) -> (*shape).
"""
from dataclasses import dataclass

import torch

from ...core.fields import Checked, knob
from .._registry import MergeConfigError, MergeContext, register_merge


@dataclass(frozen=True)
class SlerpConfig(Checked):
    t: float = knob(0.5, ge=0, le=1, doc="position between the base (0) and the model (1)")
    dot_threshold: float = knob(
        0.9995, ge=0, le=1, doc="above this |cos| the pair counts as colinear and is interpolated linearly")
    eps: float = knob(1e-8, gt=0, log=True, doc="norms below this count as zero")


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
               eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two same-shape tensors (computed in their dtype)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    omega = torch.acos(dot)
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s) * v0 + (torch.sin(t * omega) / s) * v1


@register_merge("slerp", paper="https://en.wikipedia.org/wiki/Slerp", config=SlerpConfig, inputs="weights")
def slerp(x: torch.Tensor, base: torch.Tensor, cfg: SlerpConfig, ctx: MergeContext) -> torch.Tensor:
    if x.shape[0] != 1:
        raise MergeConfigError(f"slerp: expected exactly 1 model besides the base, found {x.shape[0]}")
    return slerp_pair(cfg.t, base, x[0], cfg.dot_threshold, cfg.eps)
