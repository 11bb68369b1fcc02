"""LoRA-FA: LoRA with a frozen down-projection (Zhang et al., 2023) https://arxiv.org/abs/2308.03303

    W' = W + s * B @ A,   A: (r, in) frozen at its random init,  B: (out, r) trained, zero init

Only B trains (``out * r`` parameters per target), so the activation memory of the
A branch is ``r`` per token instead of ``in``. A is a non-persistent buffer
regenerated from ``seed`` and the target's module path, so it is NOT stored in the
adapter file: the file holds B only. Supports ``nn.Linear``, GPT-2's ``Conv1D`` and
``nn.Conv2d`` (A a conv with the base's kernel, B a 1x1 conv, as in LoRA).

>>> import torch, deltakit as dk
>>> lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> ad = dk.attach(lin, dk.get_method("lora_fa").config(r=2, targets=["0"]))
>>> ad.num_parameters(trainable_only=True)   # out * r
8
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..core.delta import BuildContext
from ..core.fields import knob
from ..core.registry import register_method
from ._base_ops import Conv1D
from ._lora_common import seeded_init
from .lora import LoRA, LoraConfig

__all__ = ["LoraFAConfig", "LoRAFA"]


@dataclass(frozen=True)
class LoraFAConfig(LoraConfig):
    """LoRA-FA hyper-parameters: LoRA's (``r``, ``alpha``, ``dropout``, ``use_rslora``,
    ``init`` - the distribution of the frozen A) plus the fields below."""

    method: ClassVar[str] = ""

    seed: int = knob(0, doc="seed of the frozen A (with the target path, it regenerates A at load)")


@register_method("lora_fa", LoraFAConfig, paper="https://arxiv.org/abs/2308.03303",
                 description="LoRA with A frozen at a seeded random init; only B trains")
class LoRAFA(LoRA):
    # A frozen at zero would make dW = 0 forever, so no Embedding (LoRA zeroes A there)
    supported = (nn.Linear, Conv1D, nn.Conv2d)

    def __init__(self, base: nn.Module, config: LoraFAConfig, ctx: BuildContext | None = None):
        super().__init__(base, config, ctx)
        shape, dev, dtype = tuple(self.lora_A.shape), self.lora_A.device, self.lora_A.dtype
        del self.lora_A
        key = ctx.name if ctx is not None else ""
        self.register_buffer("lora_A", seeded_init(shape, config.init, config.seed, key, device=dev, dtype=dtype),
                             persistent=False)
