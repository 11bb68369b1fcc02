"""SSF: Scaling & Shifting your Features (Lian et al., 2022) https://arxiv.org/abs/2210.08823

    y = gamma ⊙ (W x + b) + beta   ==   (diag(gamma) W) x + (gamma ⊙ b + beta)

so the merge folds into the target: ``dW = (gamma - 1)[:, None] ⊙ W``,
``db = (gamma - 1) ⊙ b + beta``. ``gamma, beta: (out,)`` (output channels for
Conv2d, the normalised dim for LayerNorm / RMSNorm, whose affine weight / bias play W / b).

A target WITHOUT a bias (Llama's projections, RMSNorm) cannot absorb a shift, and
the whole point of SSF is re-parameterisation into the base: there SSF learns the
scale only (``bias_free="scale_only"``, the default) or refuses
(``bias_free="error"``). We never add a bias parameter the base does not have.

Init: ``identity`` (gamma = 1, beta = 0: starts equal to the base) or ``normal``
(gamma ~ N(1, 0.02), beta ~ N(0, 0.02), the official code's choice).

>>> import torch, deltakit as dk
>>> from deltakit.methods.ssf import SSFConfig
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> ad = dk.attach(m, SSFConfig(targets=["0"]))
>>> sorted((k.split(".")[-1], tuple(p.shape)) for k, p in ad.named_parameters())
[('ssf_scale', (3,)), ('ssf_shift', (3,))]
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ._base_ops import Conv1D
from ._layout import out_axis
from .ia3 import scale_along
from .ln_tuning import is_norm

__all__ = ["SSFConfig", "SSF"]


@dataclass(frozen=True)
class SSFConfig(DeltaConfig):
    """SSF hyper-parameters."""

    init: Literal["identity", "normal"] = knob(
        "identity", doc="``identity`` (gamma=1, beta=0) or ``normal`` (N(1, std), N(0, std))")
    init_std: float = knob(0.02, ge=0, doc="standard deviation of the ``normal`` init")
    bias_free: Literal["scale_only", "error"] = knob(
        "scale_only", doc="on a target without bias, learn the scale only (``scale_only``) or raise (``error``); a "
                          "shift there could not be merged into the weights")


@register_method("ssf", SSFConfig, paper="https://arxiv.org/abs/2210.08823",
                 description="per-channel scale and shift after each target, folded into W and b")
class SSF(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d, nn.LayerNorm)  # plus RMSNorm-style, see ``supports``
    weight_dependent = True
    # the paper inserts SSF after every linear (attention and MLP) and every norm
    default_targets = {
        "bert": ("query", "key", "value", r"re:.*\.layer\.\d+\..*dense", "LayerNorm"),
        "gpt2": ("c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"),
        "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "input_layernorm", "post_attention_layernorm", "model.norm"),
    }

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        # a LayerNorm without affine parameters has nothing to fold into
        return isinstance(base, (nn.Linear, Conv1D, nn.Conv2d)) or is_norm(base)

    def __init__(self, base: nn.Module, config: SSFConfig, ctx: BuildContext):
        super().__init__()
        has_bias = getattr(base, "bias", None) is not None
        if not has_bias and config.bias_free == "error":
            raise ConfigError(f"ssf: target {ctx.name!r} has no bias to absorb the shift; expected a "
                              "biased module, found bias=None (use bias_free='scale_only')")
        self.axis = out_axis(base)
        n = base.weight.shape[self.axis]
        kw = {"device": base.weight.device, "dtype": param_dtype(base, config.adapter_dtype)}
        self.ssf_scale = nn.Parameter(torch.ones(n, **kw))
        self.ssf_shift = nn.Parameter(torch.zeros(n, **kw)) if has_bias else None
        if config.init == "normal":
            with torch.no_grad():
                self.ssf_scale.normal_(1.0, config.init_std)
                if self.ssf_shift is not None:
                    self.ssf_shift.normal_(0.0, config.init_std)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        s = self.ssf_scale.float() - 1.0
        out = {"weight": scale_along(base["weight"].float(), s, self.axis)}
        if self.ssf_shift is not None:
            out["bias"] = base["bias"].float() * s + self.ssf_shift.float()
        return out
