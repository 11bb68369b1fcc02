"""MoLA: LoRA mixture of experts with more experts in higher layers (Gao et al. 2024, "Higher
Layers Need More LoRA Experts", https://arxiv.org/abs/2402.08562).

    h = W x + sum_{i in TopK(p)} (p_i / sum_{j in TopK(p)} p_j) * s * B_i A_i x,
    p = softmax(W_r x),  s = alpha / r,  per token

Every target of block l holds E_l LoRA experts (A_i (r, in), B_i (out, r)) and a router
W_r (E_l, in) without bias; each token uses its top-k experts, their softmax probabilities
renormalised over the k (Mixtral's routing, as the official code). ``experts`` gives E_l
for consecutive groups of the targeted blocks: the paper's best allocation "2-4-6-8" is
``(2, 4, 6, 8)``, the blocks split into four equal quarters (8 layers each on LLaMA-2 7B);
a tuple as long as the number of blocks sets every block on its own (``(8,) * L`` is the
uniform MoLA(8888) baseline, ``(8, 6, 4, 2)`` the paper's inverted one).

Initialisation as the official code (github.com/GCYZSL/MoLA): every A_i and the router
Kaiming-uniform (a = sqrt 5, ``nn.Linear``'s default), every B_i zero, so the model starts
at the base. Trainable per target: ``E_l (r (in + out) + in)``. Defaults are the paper's:
r = 8, alpha = 16, top-2.

The experts run densely (every token through all E_l, scaled by its routing weight, zero
outside its top k): the same numbers as the official per-expert dispatch, at the cost of a
rank-``E_l r`` LoRA. Not mergeable (the routing depends on the token). Not implemented: the
official code's optional Switch-style load-balancing loss (off by default there).

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.nn.Sequential(torch.nn.Linear(8, 8)))
>>> ad = dk.attach(m, dk.get_method("mola").config(r=2, experts=(2, 4), targets=["0.0", "1.0"]))
>>> ad.num_parameters()   # block 0: 2 (2 (8 + 8) + 8); block 1: 4 (2 (8 + 8) + 8)
240
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import ActivationDelta, BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.targets import layer_index
from ._banks import linear_shape
from ._base_ops import Conv1D
from .lora import _cast

__all__ = ["MolaConfig", "MoLA", "Allocation", "routing_weights"]


@dataclass(frozen=True)
class MolaConfig(DeltaConfig):
    """MoLA hyper-parameters (defaults: the paper's)."""

    r: int = knob(8, ge=1, log=True, doc="rank of every LoRA expert")
    alpha: float = knob(16.0, gt=0, log=True, doc="scale numerator; each expert's update is multiplied by "
                                                  "``alpha / r``")
    experts: tuple[int, ...] = knob(
        (2, 4, 6, 8), ge=1, doc="experts per group of consecutive targeted blocks, lowest first (the targeted "
                                "blocks split into len(experts) equal groups; as many entries as blocks = per block)")
    top_k: int = knob(2, ge=1, doc="experts each token uses")
    dropout: float = knob(0.0, ge=0, lt=1, doc="dropout on the experts' input (training only)")

    def validate(self) -> None:
        if not self.experts:
            raise ConfigError("MolaConfig.experts: expected at least one expert count, found ()")
        if self.top_k > min(self.experts):
            raise ConfigError(f"MolaConfig.top_k: expected at most the smallest expert count {min(self.experts)}, "
                              f"found {self.top_k}")


class Allocation(nn.Module):
    """How many experts each targeted block gets (no parameters: rebuilt from the config and
    the target paths, so it is never stored)."""

    def __init__(self, per_block: dict[int, int]):
        super().__init__()
        self.per_block = per_block

    def extra_repr(self) -> str:
        return f"per_block={self.per_block}"


def _allocate(experts: tuple[int, ...], blocks: list[int]) -> dict[int, int]:
    """Block i of n (sorted) -> ``experts[floor(i G / n)]``: G equal groups, lowest blocks first."""
    if len(blocks) < len(experts):
        raise ConfigError(f"mola: expected at least {len(experts)} targeted blocks for the allocation "
                          f"{list(experts)}, found {len(blocks)} ({blocks})")
    n, groups = len(blocks), len(experts)
    return {b: experts[i * groups // n] for i, b in enumerate(blocks)}


def routing_weights(logits: Tensor, top_k: int) -> Tensor:
    """Dense weights (..., E): softmax over experts, kept on the top k, renormalised to sum 1."""
    p = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(p, top_k, dim=-1)
    return torch.zeros_like(p).scatter(-1, idx, top / top.sum(dim=-1, keepdim=True))


@register_method("mola", MolaConfig, paper="https://arxiv.org/abs/2402.08562",
                 description="LoRA mixture of experts, top-k routing per token, more experts in higher layers")
class MoLA(ActivationDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: MolaConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        blocks = {p: layer_index(p) for p in targets}
        missing = [p for p, b in blocks.items() if b is None]
        if missing:
            raise ConfigError(f"mola: expected targets inside numbered blocks (to allocate experts by depth), "
                              f"found {missing[:3]}")
        return Allocation(_allocate(config.experts, sorted(set(blocks.values()))))

    def __init__(self, base: nn.Module, config: MolaConfig, ctx: BuildContext):
        super().__init__()
        if ctx is None or ctx.shared is None:
            raise ConfigError("mola needs the expert allocation over blocks (build it through dk.attach)")
        fan_in, fan_out = linear_shape(base, "mola")
        E, r = ctx.shared.per_block[ctx.layer], config.r
        kw = dict(device=next(base.parameters()).device, dtype=param_dtype(base, config.adapter_dtype))
        self.n_experts, self.top_k, self.r = E, config.top_k, r
        self.scale = config.alpha / r
        self.router = nn.Parameter(torch.empty(E, fan_in, **kw))                 # W_r (E, in), no bias
        self.lora_A = nn.Parameter(torch.empty(E, r, fan_in, **kw))              # (E, r, in)
        self.lora_B = nn.Parameter(torch.zeros(E, fan_out, r, **kw))             # (E, out, r)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
            for e in range(E):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def weights(self, x: Tensor) -> Tensor:
        """Routing weights (..., E) of tokens ``x`` (..., in)."""
        return routing_weights(_cast(x, self.router) @ self.router.t(), self.top_k)

    def change(self, x: Tensor) -> Tensor:
        """``sum_i w_i s B_i A_i x`` (..., out), every expert at once as one rank-E r LoRA."""
        A = self.lora_A.reshape(-1, self.lora_A.shape[-1])                      # (E r, in)
        B = self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], -1)      # (out, E r)
        xa = _cast(x, A)
        w = self.weights(xa).to(A.dtype) * self.scale                           # (..., E)
        h = self.dropout(xa) @ A.t()                                            # (..., E r)
        h = h * w.repeat_interleave(self.r, dim=-1)
        return h @ B.t()

    def forward(self, inner, x, *args, **kwargs):
        out = inner(x, *args, **kwargs)
        return out + self.change(x).to(out.dtype)

    @classmethod
    def mixed_forward(cls, base: nn.Module, deltas: Sequence["MoLA"], row: Tensor, x, *args, **kwargs):
        """Rows of different adapters in one base pass: tokens route independently, so each
        adapter's change is computed on every row and kept where the row is its own."""
        out = base(x, *args, **kwargs)
        new = out
        for k, d in enumerate(deltas):
            keep = (row == k).view(-1, *([1] * (out.dim() - 1)))
            new = torch.where(keep, out + d.change(x).to(out.dtype), new)
        return new

    @classmethod
    def contract_config(cls, kind: str) -> MolaConfig | None:
        return None if kind == "conv" else MolaConfig(r=2, experts=(2, 3), top_k=2)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, top_k={self.top_k}, r={self.r}"
