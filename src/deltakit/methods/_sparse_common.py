"""Shared parts of the fixed-mask sparse methods (``sparse_mask.py``) and of HFT.

A sparse delta keeps ``k = round(density * numel)`` positions of a weight:

    dW = scatter(zeros_like(W), indices, values)     indices: (k,) int, values: (k,) trainable

Both are stored (indices as int32 when they fit), so the file holds about
``density * numel * (4 + bytes per value)`` bytes. Which positions is the
subclass's ``select`` (random, smallest magnitude, largest gradient).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, WeightDelta, param_dtype
from ..core.layer import DeltaStateError
from ..core.fields import knob
from ..core.registry import DeltaConfig
from ._base_ops import Conv1D

__all__ = ["SparseConfig", "SparseMaskDelta", "ALL_LINEAR", "num_selected"]

# Every weight matrix of the attention and feed-forward blocks, per family.
ALL_LINEAR: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", r"re:.*\.layer\.\d+\..*dense"),
    "roberta": ("query", "key", "value", r"re:.*\.layer\.\d+\..*dense"),
    "gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class SparseConfig(DeltaConfig):
    """Fields shared by the sparse fixed-mask methods."""

    density: float = knob(
        0.01, gt=0, le=1, log=True, doc="fraction ``p`` of each target weight's entries that are trainable")


def num_selected(numel: int, density: float) -> int:
    """``k``: how many entries a target of ``numel`` entries trains (at least one)."""
    return max(1, round(density * numel))


class SparseMaskDelta(WeightDelta):
    """``dW = M ⊙ D`` with a fixed mask M given by ``indices`` (flat positions in the weight)."""

    supported = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)
    default_targets = ALL_LINEAR
    # Above this density ``residual`` multiplies by the scattered dense dW instead of gathering.
    # Measured (MiniLM 384x384 / 384x1536, 1024 tokens, bf16 autocast, forward + backward):
    # gathering wins 2-4x at 0.05-0.2%, the matmul wins 1.6-3x at 1% and needs a (tokens, k)
    # tensor less; the crossover is near 0.35%. (It was 25%, which made the default 1% masks
    # train 4x slower than LoRA in the methods benchmark.)
    gather_max_density = 1 / 256

    def __init__(self, base: nn.Module, config: SparseConfig, ctx: BuildContext):
        super().__init__()
        w = base.weight
        self.shape = tuple(w.shape)
        k = num_selected(w.numel(), config.density)
        idx_dtype = torch.int32 if w.numel() < 2**31 else torch.int64
        idx = self.select(base, config, ctx, k)
        self.register_buffer("indices", idx.to(device=w.device, dtype=idx_dtype))   # (k,)
        self.values = nn.Parameter(torch.zeros(k, device=w.device, dtype=param_dtype(base, config.adapter_dtype)))
        self.conv1d = isinstance(base, Conv1D)
        if not isinstance(base, (nn.Linear, Conv1D)):
            # the fast path below is for matrices; conv / embedding targets use W + dW
            self.residual = None

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        """``x @ dW^T``. While the mask is very sparse, without forming dW: gather the k inputs
        each kept entry reads, scale by its value, scatter-add into its output (O(tokens * k))."""
        idx = self._checked_indices()
        v = self.values
        x = x if x.dtype == v.dtype else x.to(v.dtype)
        n_in, n_out = (self.shape if self.conv1d else self.shape[::-1])
        if idx.numel() > self.gather_max_density * n_in * n_out:   # a matmul is cheaper
            return torch.nn.functional.linear(x, self._dense_out_in().to(v.dtype))
        i, o = (idx // n_out, idx % n_out) if self.conv1d else (idx % n_in, idx // n_in)
        contrib = x[..., i] * v                                            # (..., k)
        return x.new_zeros(*x.shape[:-1], n_out).index_add_(-1, o, contrib)

    def _dense_out_in(self) -> Tensor:
        w = self.delta({})["weight"]
        return w.t() if self.conv1d else w

    def select(self, base: nn.Module, config: SparseConfig, ctx: BuildContext, k: int) -> Tensor:
        """Flat indices (k,) of the trainable entries."""
        raise NotImplementedError

    def set_indices(self, idx: Tensor) -> None:
        """Replace the mask (e.g. after calibration); only while the values are still zero."""
        if idx.shape != self.indices.shape:
            raise ValueError(f"expected {tuple(self.indices.shape)} indices, found {tuple(idx.shape)}")
        if self.values.detach().abs().sum() != 0:
            raise DeltaStateError("cannot move the sparse mask after training started (values are non-zero)")
        self.indices.copy_(idx.to(self.indices))

    def _checked_indices(self) -> Tensor:
        idx = self.indices.long()
        if idx.numel() and idx[0] < 0:
            raise DeltaStateError(f"{type(self).__name__}: the mask is not set yet; call calibrate(adapter, ...) first")
        return idx

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        idx = self._checked_indices()
        numel = 1
        for s in self.shape:
            numel *= s
        dw = self.values.float().new_zeros(numel).index_put((idx,), self.values.float())
        return {"weight": dw.view(self.shape)}


def top_k(scores: Tensor, k: int) -> Tensor:
    """Flat indices of the k largest scores, sorted (deterministic ties: lowest index first)."""
    flat = scores.detach().flatten().float()
    # stable sort so equal scores pick the lowest index (reproducible masks)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values
