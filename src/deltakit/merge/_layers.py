"""Layer indices from parameter names (for LiNeS and mergekit-style layer gradients)."""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["layer_index", "count_layers", "lines_factor"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer block index in ``name`` (``model.layers.3.mlp...`` -> 3), else None."""
    m = _LAYER.search(name) or _ANY_INDEX.search(name)
    return int(m.group(1)) if m else None


def count_layers(names: Iterable[str]) -> int:
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else 0


def lines_factor(name: str, layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS (Wang et al., 2025) https://arxiv.org/abs/2410.17146

    ``lambda(l) = alpha + beta * l / (L - 1)`` for block l of L (shallow layers keep less of
    the task vector, deep layers more). Every parameter outside the residual blocks
    (embeddings, final norm, LM head, pooler, classifier: ``layer is None``) gets ``alpha``,
    as in the authors' code (``LiNeS_scaling`` in
    https://github.com/wang-kee/LiNeS/blob/main/src/eval/eval.py: ``layer_scalings_dict.get(k,
    alpha)``, "scale with alpha for layers outside residual blocks"); the paper's text does
    not single out the head, and the code is what its figures were made with. ``name`` is
    kept for callers and future per-name rules; the factor depends on ``layer`` alone.

    >>> [lines_factor(n, i, 3, 0.25, 0.5) for n, i in [("layers.0.w", 0), ("layers.2.w", 2), ("lm_head.weight", None)]]
    [0.25, 0.75, 0.25]
    """
    if layer is None:
        return alpha
    return alpha + beta * (layer / (num_layers - 1) if num_layers > 1 else 1.0)
