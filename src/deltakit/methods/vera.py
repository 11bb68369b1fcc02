"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024)
https://arxiv.org/abs/2310.11454

    dW = diag(b) @ B @ diag(d) @ A,    A: (r, in), B: (out, r) frozen, random, shared;
                                       d: (r,) and b: (out,) trained per layer

One pair of random matrices ``A_shared (r, in_max)``, ``B_shared (out_max, r)`` serves
every target. They are kaiming-uniform (bound ``sqrt(6 / fan_in)``) drawn A then B from
one CPU generator seeded with ``config.seed``, the same draw as peft's VeRA with
``projection_prng_key=seed``, so both libraries regenerate identical matrices. A target
uses the top-left slices ``A_shared[:, :in]`` and ``B_shared[:out, :]``. They are
regenerated from ``config.seed`` and kept as non-persistent buffers: they are NOT in
the adapter file, only the seed (in the manifest's config) is. ``b`` starts at zero
so the model starts equal to the base; ``d`` starts at ``d_initial``.
Trainable parameters: ``sum over targets (r + out)``.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 6))
>>> ad = dk.attach(m, dk.get_method("vera").config(r=16, targets=["0", "1"]))
>>> ad.num_parameters()  # (16 + 4) + (16 + 6)
42
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.seeding import generator
from ._banks import FactoredDelta, layout, linear_shape, target_device
from ._base_ops import Conv1D, in_out

__all__ = ["VeraConfig", "VeRA", "VeraShared"]


@dataclass(frozen=True)
class VeraConfig(DeltaConfig):
    """VeRA hyper-parameters."""

    r: int = knob(
        256, ge=1, log=True, doc="rank of the shared random matrices (the paper uses large r, e.g. 256-1024)")
    d_initial: float = knob(0.1, doc="initial value of every entry of the scaling vector ``d`` (paper: 0.1)")
    seed: int = knob(0, doc="seed that regenerates the shared random A and B (not saved as tensors)")


class VeraShared(nn.Module):
    """The frozen shared random pair, as non-persistent buffers rebuilt from the seed."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device: torch.device):
        super().__init__()
        g = generator(seed, scheme="raw")   # peft: projection_prng_key, no keys mixed in
        A = torch.empty(r, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=g)
        B = torch.empty(out_max, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
        self.register_buffer("vera_A", A.to(device), persistent=False)
        self.register_buffer("vera_B", B.to(device), persistent=False)


@register_method("vera", VeraConfig, paper="https://arxiv.org/abs/2310.11454",
                 description="shared frozen random A, B; trains scaling vectors d (r) and b (out) per layer")
class VeRA(FactoredDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: VeraConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        shapes = [in_out(m) for m in targets.values() if isinstance(m, cls.supported)]
        if not shapes:
            raise ConfigError("VeRA: expected at least one Linear or Conv1D target, found none")
        return VeraShared(config.r, max(s[0] for s in shapes), max(s[1] for s in shapes),
                          config.seed, target_device(targets))

    def __init__(self, base: nn.Module, config: VeraConfig, ctx: BuildContext):
        super().__init__()
        fan_in, fan_out = linear_shape(base, "VeRA")
        if ctx.shared is None:
            raise ConfigError("VeRA: expected the adapter's shared random matrices, found none")
        # A reference, not a submodule: the shared pair exists once on the model.
        object.__setattr__(self, "_shared", ctx.shared)
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        self.fan_in, self.fan_out = fan_in, fan_out
        self.layout = layout(base)
        self.scale = 1.0
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=dev, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(fan_out, device=dev, dtype=dtype))

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """``(diag(d) A, diag(b) B)`` with the shared pair sliced to this target."""
        A = self._shared.vera_A[:, : self.fan_in].to(self.vera_lambda_d.dtype)     # (r, in)
        B = self._shared.vera_B[: self.fan_out, :].to(self.vera_lambda_d.dtype)    # (out, r)
        return self.vera_lambda_d[:, None] * A, self.vera_lambda_b[:, None] * B

    @classmethod
    def contract_config(cls, kind: str) -> VeraConfig | None:
        return None if kind == "conv" else VeraConfig(r=8)
