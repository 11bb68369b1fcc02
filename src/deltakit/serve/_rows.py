"""The running batch's rows: their KV cache, attention mask and positions, joined and split
between decode steps.

Scheme (continuous batching with a plain ``transformers`` dynamic cache): every row's real
tokens sit right-aligned in the cache, with padding on the left that the attention mask hides.
A newcomer is prefilled on its own (left-padded among the other newcomers); its cache rows are
then padded on the left to the running width (or the running rows to the newcomer's) and
concatenated on the batch axis. Positions come from each row's own token count, never from the
cache column, so a row's numbers do not depend on how much padding it carries: its greedy
tokens equal the same request decoded alone (tested token for token). Rows that leave are
dropped with an index select, and columns that are padding in every remaining row are cut off,
so the width stays the longest live row's length.

Only caches made of per-layer ``keys`` / ``values`` tensors shaped ``(B, H, T, D)`` (the
``DynamicCache`` of transformers 5 for full-attention models) are supported; anything else is
refused with a one-line error rather than decoded wrongly (sliding-window layers drop columns).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Rows", "check_cache"]


def _layers(cache: Any) -> list:
    return list(getattr(cache, "layers", None) or [])


def check_cache(cache: Any) -> None:
    """Refuse a cache whose rows cannot be moved between batches by this module."""
    layers = _layers(cache)
    if not layers:
        raise TypeError(f"expected a transformers cache with per-layer keys/values, found {type(cache).__name__}")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not isinstance(getattr(layer, "keys", None), Tensor):
            raise TypeError(f"expected full-attention dynamic cache layers, found {type(layer).__name__} "
                            "(sliding-window and static caches are not served yet)")


def _pad_left(t: Tensor, width: int) -> Tensor:
    """``t`` (B, ..., T, D) or mask (B, T) padded with zeros on the left of its time axis to ``width``."""
    axis = -2 if t.dim() == 4 else -1
    extra = width - t.shape[axis]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[axis] = extra
    return torch.cat([t.new_zeros(shape), t], dim=axis)


@dataclass
class Rows:
    """The running batch: cache, mask (B, T), next position (B,) and last token (B,) per row."""

    cache: Any
    mask: Tensor
    pos: Tensor
    last: Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def join(self, other: Rows) -> None:
        """Append ``other``'s rows after these (its cache is consumed)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])

    def keep(self, index: list[int]) -> None:
        """Keep rows ``index`` (in that order), then drop columns that are padding in all of them."""
        idx = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        live = mask.any(0).nonzero()
        start = int(live[0]) if len(live) else mask.shape[1]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[..., start:, :]
            layer.values = layer.values.index_select(0, idx)[..., start:, :]
        self.mask = mask[:, start:]
        self.pos = self.pos.index_select(0, idx)
        self.last = self.last.index_select(0, idx)

    def step_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(ids (B, 1), mask (B, T + 1), positions (B, 1)) for the next decode forward."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        return self.last[:, None], self.mask, self.pos[:, None]
