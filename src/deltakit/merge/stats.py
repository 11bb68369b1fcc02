"""Data statistics some merge methods need: diagonal Fisher and linear-layer Gram matrices.

They need a model and data, so they live here, not in the pure methods. The results are
plain ``name -> tensor`` dicts; :func:`stack_stats` turns one dict per model into the
``stats_for(name)`` callable the executor passes to a method.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

# one implementation for every data-statistics user (RegMean / Fisher here; CorDA, SPT in methods/)
from ..core.stats import collect_grams, estimate_fisher

__all__ = ["estimate_fisher", "collect_grams", "stack_stats"]


def stack_stats(kind: str, per_model: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[str], dict[str, torch.Tensor]]:
    """``stats_for(name) -> {kind: (K, ...)}`` when every model has ``name``, else ``{}``."""
    def stats_for(name: str) -> dict[str, torch.Tensor]:
        if all(name in s for s in per_model):
            return {kind: torch.stack([s[name] for s in per_model])}
        return {}
    return stats_for
