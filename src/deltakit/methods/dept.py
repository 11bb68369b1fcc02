"""DePT: decomposed prompt tuning (Shi & Lipani 2024, https://arxiv.org/abs/2309.05173).

    inputs_embeds' = [P ; E(x) + (A @ B)[:T]],   P: (m, d),  A: (s, r),  B: (r, d)

A shorter soft prompt P (m virtual tokens) plus a low-rank, *position-based* offset
of the input token embeddings: row t of ``A @ B`` is added to the embedding of the
t-th input token, for sequences up to ``max_length`` = s tokens. Trainable
parameters: m d + s r + r d (the paper picks m, r so that this equals the
l d of a prompt-tuning baseline with l tokens). The paper trains P and (A, B) with
two learning rates (larger for P); :func:`dept_param_groups` builds the two
optimizer groups.

Initialisation: P as prompt tuning (``vocab`` / ``random``); A Kaiming-uniform, B = 0,
so the token embeddings start unchanged. Everything else (backbone wrapping,
stripped virtual positions, mixed batches) is prompt tuning's, see
:mod:`deltakit.methods.prompt_tuning`.

>>> import deltakit as dk
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2, n_positions=16,
...                                bos_token_id=0, eos_token_id=1))
>>> cfg = dk.get_method("dept").config(num_virtual_tokens=2, r=2, max_length=8)
>>> dk.attach(m, cfg).num_parameters()   # m d + s r + r d = 16 + 16 + 16
48
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter
from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from .prompt_tuning import BACKBONES, PromptedBackbone, PromptTuningConfig, _is_backbone, init_prompt

__all__ = ["DeptConfig", "DePT", "dept_param_groups"]


@dataclass(frozen=True)
class DeptConfig(PromptTuningConfig):
    """DePT hyper-parameters (plus the prompt fields of :class:`PromptTuningConfig`)."""

    method: ClassVar[str] = ""
    num_virtual_tokens: int = 60
    r: int = knob(60, ge=1, log=True, doc="rank of the embedding offset A @ B")
    max_length: int = knob(256, ge=1, doc="s, the longest input (in tokens) the offset covers")

    def validate(self) -> None:
        super().validate()


@register_method("dept", DeptConfig, paper="https://arxiv.org/abs/2309.05173",
                 description="short soft prompt + low-rank position-wise offset of the input embeddings")
class DePT(PromptedBackbone):
    supported: ClassVar[tuple[type, ...]] = ()
    default_targets = BACKBONES

    def __init__(self, base: nn.Module, config: DeptConfig, ctx: BuildContext | None = None):
        super().__init__()
        if not _is_backbone(base):
            raise ConfigError(f"DePT targets a transformers backbone (with get_input_embeddings), "
                              f"found {type(base).__name__}")
        self._bind(base)
        emb = base.get_input_embeddings()
        dtype = param_dtype(base, config.adapter_dtype)
        dev = emb.weight.device
        d = emb.weight.shape[1]
        self.n = config.num_virtual_tokens
        self.max_length = config.max_length
        self.prompt_embeddings = nn.Parameter(init_prompt(emb.weight, self.n, config).to(dtype))  # (m, d)
        self.lora_embedding_A = nn.Parameter(torch.empty(config.max_length, config.r, dtype=dtype, device=dev))
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.r, d, dtype=dtype, device=dev))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))

    def prompt(self) -> Tensor:
        return self.prompt_embeddings

    def token_update(self, T: int) -> Tensor:
        if T > self.max_length:
            raise ConfigError(f"DePT: input has {T} tokens, the embedding offset covers max_length="
                              f"{self.max_length}; raise max_length")
        return self.lora_embedding_A[:T] @ self.lora_embedding_B           # (T, d)

    @classmethod
    def contract_config(cls, kind: str) -> DeltaConfig | None:
        return None if kind == "conv" else DeptConfig(num_virtual_tokens=2, r=2, max_length=8)


def dept_param_groups(adapter: Adapter, prompt_lr: float, lowrank_lr: float, **extra: Any) -> list[dict]:
    """Two optimizer groups, as the paper trains P and (A, B) at different learning rates.

    >>> # torch.optim.AdamW(dept_param_groups(adapter, prompt_lr=3e-1, lowrank_lr=1e-4))
    """
    if adapter.spec.name != "dept":
        raise ConfigError(f"dept_param_groups: expected a DePT adapter, found method {adapter.spec.name!r}")
    prompt, lowrank = [], []
    for _, delta in adapter.deltas():
        prompt.append(delta.prompt_embeddings)
        lowrank += [delta.lora_embedding_A, delta.lora_embedding_B]
    return [{"params": prompt, "lr": prompt_lr, **extra}, {"params": lowrank, "lr": lowrank_lr, **extra}]
