"""ETHER / ETHER+: fine-tuning with hyperplane reflections (Bini et al., 2024)
https://arxiv.org/abs/2405.20271 (official code: https://github.com/mwbini/ether)

    ETHER:  H  = I - 2 u u^T / ||u||^2                      (a Householder reflection)
    ETHER+: H+ = I - u u^T / ||u||^2 + v v^T / ||v||^2       (relaxed, not orthogonal)

``H`` is block-diagonal with ``nb`` blocks. In torch's ``(out, in)`` layout the
one-sided transform acts on the input features, ``W' = W H`` (the paper's
``W' = H W`` with ``W: (d_in, d_out)``, as in the official code); two-sided
(the official ``etherplusHH``) also transforms the output side,
``W' = H_out W H_in``. Bias untouched. Parameters: ``u: (nb, in/nb)`` (+ ``v``
for ETHER+, + ``u_out[, v_out]: (nb, out/nb)`` two-sided).

Init (as the official code): ``u`` Kaiming-uniform; ETHER+ sets ``v = -u`` so that
``H+ = I`` and the model starts equal to the base. Plain ETHER is a reflection
from the first step (``||H - I||_F = 2`` per block), by design NOT the identity.

>>> import torch, deltakit as dk
>>> from deltakit.methods.ether import EtherConfig
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(m, EtherConfig(nb=2, targets=["0"]))
>>> [tuple(p.shape) for p in ad.parameters()]
[(2, 4)]
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._base_ops import Conv1D, in_out

__all__ = ["EtherConfig", "Ether", "householder", "ether_plus"]


@dataclass(frozen=True)
class EtherConfig(DeltaConfig):
    """ETHER hyper-parameters."""

    variant: Literal["ether", "plus"] = knob(
        "ether", doc="``ether`` (reflection) or ``plus`` (ETHER+, the relaxed two-projection form)")
    nb: int = knob(1, ge=1, doc="number of diagonal blocks (the transformed dims must be divisible by it)")
    two_sided: bool | None = knob(
        None, doc="also transform the output side (``W' = H_out W H_in``); None = the paper's default per "
                  "variant (ETHER one-sided, ETHER+ two-sided)")

    @property
    def sides(self) -> int:
        two = self.two_sided if self.two_sided is not None else self.variant == "plus"
        return 2 if two else 1


def householder(u: Tensor) -> Tensor:
    """Block reflections ``I - 2 u u^T / ||u||^2``; u: (nb, b) -> (nb, b, b)."""
    eye = torch.eye(u.shape[-1], device=u.device, dtype=u.dtype)
    return eye - 2.0 * _proj(u)


def ether_plus(u: Tensor, v: Tensor) -> Tensor:
    """``I - u u^T / ||u||^2 + v v^T / ||v||^2``; u, v: (nb, b) -> (nb, b, b)."""
    eye = torch.eye(u.shape[-1], device=u.device, dtype=u.dtype)
    return eye - _proj(u) + _proj(v)


def _proj(u: Tensor) -> Tensor:
    return u[:, :, None] * u[:, None, :] / (u * u).sum(-1)[:, None, None]   # (nb, b, b)


@register_method("ether", EtherConfig, paper="https://arxiv.org/abs/2405.20271",
                 description="block-diagonal hyperplane reflections W H (ETHER) / relaxed ETHER+")
class Ether(WeightDelta):
    supported = (nn.Linear, Conv1D)
    weight_dependent = True

    def __init__(self, base: nn.Module, config: EtherConfig, ctx: BuildContext):
        super().__init__()
        fan_in, fan_out = in_out(base)
        nb, sides = config.nb, config.sides
        dims = [("in", fan_in)] + ([("out", fan_out)] if sides == 2 else [])
        for side, n in dims:
            if n % nb:
                raise ConfigError(f"ether: target {ctx.name!r} has {side}_features={n}, expected a multiple "
                                  f"of nb={nb}")
        self.variant = config.variant
        self.conv1d = isinstance(base, Conv1D)  # GPT-2 stores (in, out)
        kw = {"device": base.weight.device, "dtype": param_dtype(base, config.adapter_dtype)}
        self.ether_u = nn.Parameter(torch.empty(nb, fan_in // nb, **kw))
        self.ether_v = nn.Parameter(torch.empty(nb, fan_in // nb, **kw)) if self.variant == "plus" else None
        self.ether_u_out = nn.Parameter(torch.empty(nb, fan_out // nb, **kw)) if sides == 2 else None
        self.ether_v_out = (nn.Parameter(torch.empty(nb, fan_out // nb, **kw))
                            if sides == 2 and self.variant == "plus" else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for u, v in ((self.ether_u, self.ether_v), (self.ether_u_out, self.ether_v_out)):
            if u is None:
                continue
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
            if v is not None:
                v.copy_(-u)  # H+ = I at init (official code)

    def transforms(self) -> tuple[Tensor, Tensor | None]:
        """(H_in, H_out): block stacks (nb, b, b); H_out is None one-sided."""
        def make(u, v):
            if u is None:
                return None
            return householder(u.float()) if v is None else ether_plus(u.float(), v.float())
        return make(self.ether_u, self.ether_v), make(self.ether_u_out, self.ether_v_out)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        w0 = base["weight"].float()
        w = w0.t() if self.conv1d else w0                                     # (out, in)
        h_in, h_out = self.transforms()
        out, fin = w.shape
        nb = h_in.shape[0]
        w_new = torch.einsum("onb,nbc->onc", w.reshape(out, nb, fin // nb), h_in).reshape(out, fin)
        if h_out is not None:
            w_new = torch.einsum("nab,nbi->nai", h_out, w_new.reshape(nb, out // nb, fin)).reshape(out, fin)
        return {"weight": (w_new.t() if self.conv1d else w_new) - w0}
