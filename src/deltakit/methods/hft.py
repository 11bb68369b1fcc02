"""HFT: Half Fine-Tuning (Hui et al., 2024) https://arxiv.org/abs/2404.18466

    per block and per category (self-attention / feed-forward matrices): a seeded
    random half of the targets is trained in full (W' = P, P initialised to W), the
    other half stays frozen at the base.

An odd category (Llama's 3 FFN matrices) trains ``floor`` or ``ceil`` of half with
equal probability, so the expected fraction is ``ratio``, as in the paper's
category-level selection. Only the trained half is stored (full copies); the
frozen targets carry an empty delta. The selection is a pure function of
``seed`` and the target list, recomputed at load (nothing extra in the file).
The paper re-draws the half at every training stage; here one adapter is one
stage (use a new ``seed`` for the next).

>>> import torch, deltakit as dk
>>> from deltakit.methods.hft import HFTConfig
>>> block = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4), "k_proj": torch.nn.Linear(4, 4)})
>>> m = torch.nn.ModuleList([block])                     # block 0, two attention matrices
>>> dk.attach(m, HFTConfig(targets=["q_proj", "k_proj"])).num_parameters()   # one of them: 4*4 + 4
20
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta
from ..core.fields import knob
from ..core.registry import DeltaConfig, register_method
from ..core.targets import layer_index
from ._base_ops import Conv1D
from ._sparse_common import ALL_LINEAR

__all__ = ["HFTConfig", "HFT", "hft_selection"]

_ATTENTION_WORDS = ("attn", "attention", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class HFTConfig(DeltaConfig):
    """HFT hyper-parameters."""

    ratio: float = knob(0.5, gt=0, le=1, doc="fraction of each category's matrices trained (0.5 = half)")
    seed: int = knob(0, doc="seed of the selection")


def hft_selection(paths: list[str], ratio: float, seed: int) -> frozenset[str]:
    """The trained targets: per (block, category) group, a random ``ratio`` of them
    (``floor``/``ceil`` of ``ratio * n`` chosen with the matching probability)."""
    rng = random.Random(seed)
    groups: dict[tuple, list[str]] = {}
    for p in paths:
        category = "attention" if any(w in p.lower() for w in _ATTENTION_WORDS) else "feed_forward"
        groups.setdefault((layer_index(p), category), []).append(p)
    chosen: list[str] = []
    for key in sorted(groups, key=lambda k: (k[0] is None, k[0] or 0, k[1])):
        members = sorted(groups[key])  # independent of the order targets come in (manifests sort)
        want = ratio * len(members)
        n = int(want) + (1 if rng.random() < want - int(want) else 0)
        chosen += rng.sample(members, n)
    return frozenset(chosen)


class _Selection(nn.Module):
    """Holds the trained-target set (no tensors: it is recomputed from the seed)."""

    def __init__(self, trained: frozenset[str]):
        super().__init__()
        self.trained = trained

    def extra_repr(self) -> str:
        return f"trained={len(self.trained)}"


@register_method("hft", HFTConfig, paper="https://arxiv.org/abs/2404.18466",
                 description="half fine-tuning: a seeded half of each block's matrices trained in full")
class HFT(WeightDelta):
    supported = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding, nn.LayerNorm)
    weight_dependent = True
    default_targets = ALL_LINEAR

    @classmethod
    def build_shared(cls, config: HFTConfig, targets: Mapping[str, nn.Module]) -> _Selection:
        return _Selection(hft_selection(list(targets), config.ratio, config.seed))

    def __init__(self, base: nn.Module, config: HFTConfig, ctx: BuildContext):
        super().__init__()
        self.trained = ctx.name in ctx.shared.trained
        params = dict(base.named_parameters(recurse=False)) if self.trained else {}
        self.values = nn.ParameterDict({k: nn.Parameter(p.detach().clone()) for k, p in params.items()})

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.float() - base[k].float() for k, v in self.values.items()}

    def extra_repr(self) -> str:
        return f"trained={self.trained}"
