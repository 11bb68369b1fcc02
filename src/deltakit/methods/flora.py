"""FLoRA: Low-Rank Core Space for N-dimension (Si et al., 2024) https://arxiv.org/abs/2405.14739

    dW = s * G x_1 U_1 x_2 U_2 ... x_N U_N        (Tucker form, x_n = mode-n product)

The delta keeps the weight's own number of dimensions instead of flattening it:

* Linear / Conv1D (N = 2): ``G (r, r)``, ``U_1 = flora_U_out (out, r)``, ``U_2 =
  flora_U_in (in, r)``, i.e. ``dW = s * U_out @ G @ U_in.T``;
* Conv2d (N = 4): ``G (r, r, r_k, r_k)`` and one factor per mode: ``U_out (out, r)``,
  ``U_in (in, r)``, ``U_kh (kh, r_k)``, ``U_kw (kw, r_k)``; dW stays ``(out, in, kh, kw)``.

Init as the reference code: the core G is zero and every factor kaiming-normal, so the
model starts at the base. Trainable per target: ``prod(r_n) + sum_n d_n r_n``.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(m, dk.get_method("flora").config(r=2, targets=["0"]))
>>> ad.num_parameters()  # r*r + out*r + in*r
28
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._banks import layout, to_layout
from ._base_ops import Conv1D, in_out

__all__ = ["FloraConfig", "FLoRA", "tucker_to_tensor"]


@dataclass(frozen=True)
class FloraConfig(DeltaConfig):
    """FLoRA hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="Tucker rank of the output- and input-channel modes")
    r_kernel: int | None = knob(
        None, ge=1, doc="Tucker rank of the two spatial modes of a Conv2d kernel; None = the kernel size (no "
                        "compression along space)")
    scale: float = knob(1.0, doc="the factor ``s`` on dW")


def tucker_to_tensor(core: Tensor, factors: list[Tensor]) -> Tensor:
    """``core x_1 factors[0] x_2 factors[1] ...``; factor n is ``(d_n, r_n)``."""
    out = core
    for n, U in enumerate(factors):
        # contract mode n of ``out`` with U's rank dim, then put the new d_n axis back at n
        out = torch.movedim(torch.tensordot(out, U.to(out.dtype), dims=([n], [1])), -1, n)  # autocast: mm may return bf16
    return out


@register_method("flora", FloraConfig, paper="https://arxiv.org/abs/2405.14739",
                 description="Tucker-factored delta that keeps the weight's N dimensions (core G, one factor per mode)")
class FLoRA(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d)

    def __init__(self, base: nn.Module, config: FloraConfig, ctx: BuildContext | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ConfigError(f"FLoRA on grouped Conv2d is not supported (groups={base.groups})")
        fan_in, fan_out = in_out(base)
        self.layout = layout(base)
        dims = [fan_out, fan_in]
        ranks = [config.r, config.r]
        names = ["flora_U_out", "flora_U_in"]
        if isinstance(base, nn.Conv2d):
            kh, kw = base.kernel_size
            dims += [kh, kw]
            ranks += [config.r_kernel or kh, config.r_kernel or kw]
            names += ["flora_U_kh", "flora_U_kw"]
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        self.scale = config.scale
        self.names = names
        self.flora_G = nn.Parameter(torch.zeros(ranks, device=dev, dtype=dtype))
        for name, d, r in zip(names, dims, ranks):
            U = nn.Parameter(torch.empty(d, r, device=dev, dtype=dtype))
            nn.init.kaiming_normal_(U, a=math.sqrt(3))   # the reference code's choice
            setattr(self, name, U)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dw = tucker_to_tensor(self.flora_G, [getattr(self, n) for n in self.names]) * self.scale
        return {"weight": to_layout(dw, self.layout)}

    def factors(self) -> tuple[Tensor, Tensor, float, tuple[int, ...]]:
        """``(B', A', s, shape)`` with ``dW = s * B' @ A'`` in the weight's layout, so task
        vectors stay factored: unfolded along the output mode, dW = U_out @ (G x_2 U_in ...),
        of rank <= r (LoRA's protocol for :meth:`deltakit.Adapter.task_vector`)."""
        U_out = self.flora_U_out                                            # (out, r)
        eye = torch.eye(U_out.shape[1], device=U_out.device, dtype=U_out.dtype)
        rest = tucker_to_tensor(self.flora_G, [eye] + [getattr(self, n) for n in self.names[1:]])
        A = rest.reshape(U_out.shape[1], -1)                                # (r, in[*kh*kw])
        if self.layout == "conv1d":
            return A.t(), U_out.t(), self.scale, (A.shape[1], U_out.shape[0])
        return U_out, A, self.scale, (U_out.shape[0], *rest.shape[1:])
