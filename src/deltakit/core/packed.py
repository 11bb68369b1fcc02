"""Base modules whose weight is stored packed (quantised) and formed on demand.

A :class:`PackedLinear` computes ``y = x @ W.T + b`` like ``nn.Linear``, but ``W`` lives
as buffers in a compact form (e.g. 4-bit codes plus per-group scales, QLoRA style,
:mod:`deltakit.compress.qbase`) and :meth:`PackedLinear.dequantize` rebuilds it. Being
buffers, the packed tensors never train and the base fingerprint covers them as stored.

It deliberately has no ``weight`` attribute: a fresh tensor per access would make
``m.weight.data.copy_(...)`` write into a temporary, silently, and the layer's
fold-into-the-weight shortcut would take it for a real parameter.

Weight deltas with a residual path (LoRA) run beside it, unmerged (the QLoRA norm).
:class:`~deltakit.core.layer.DeltaLayer` refuses to merge into it: writing ``W + dW``
back would have to requantise, which is lossy and could not be undone exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PackedLinear"]


class PackedLinear(nn.Module):
    """A linear layer over a packed weight: subclasses store it and implement :meth:`dequantize`."""

    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (``dtype``: default the
        original weight's)."""
        raise NotImplementedError
