"""Export any weight delta as a peft LoRA adapter: truncated SVD per layer, written by the
existing peft writer, so peft loads it and LoRA servers (vLLM, LoRAX) serve it.

Input: a :class:`~deltakit.taskvec.TaskVector` of any codecs (dense, compressed, ``LowRank``),
a mapping ``name -> value``, or an attached adapter of any weight-delta method (LoHa, OFT, IA3...,
through ``TaskVector.from_adapter``). Each entry ``<path>.weight`` of a Linear, GPT-2 Conv1D,
Conv2d or Embedding is decoded (one at a time) and factored, ``dW ~ B A`` with
``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` (Eckart-Young: the best rank-r approximation).

The rank is ``rank`` for every layer (capped by the layer's size), or per layer the smallest
``r`` keeping ``energy`` of ``|dW|_F^2``. The error is reported per layer and in total as the
relative Frobenius error ``|dW - B A|_F / |dW|_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``.

The factors go into a deltakit LoRA adapter (``alpha = r``, so the scale is 1) attached to
``model`` for the moment of the export, and :func:`deltakit.io.peft.export_peft` writes it:
one peft writer for everything. deltakit's LoRA has one rank per adapter, so layers picked
at a smaller rank are zero-padded to the largest (their product unchanged): vLLM pads every
adapter to its ``max_lora_rank`` anyway, the cost is disk bytes (reported as ``padded``).

>>> report = export_lora(TaskVector.load("tv-topk"), model, "lora-out", energy=0.9)  # doctest: +SKIP
>>> report.total_error                                                                # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, attach, detach
from ..core.layer import DeltaLayer
from ..io.peft import export_peft
from ..methods._base_ops import Conv1D
from ..methods.lora import LoRA, LoraConfig
from ..taskvec import Delta, TaskVector, as_dense

__all__ = ["LayerFit", "LoraExport", "svd_factors", "export_lora"]

_SUPPORTED = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)  # what a peft LoRA wraps
_TMP = "deltakit-lora-export"


@dataclass(frozen=True)
class LayerFit:
    """One layer's factorisation: its rank, ``|dW|_F`` and the kept / dropped squared norm."""

    rank: int
    full_rank: int
    kept: float   # sum_{i<=r} s_i^2
    total: float  # |dW|_F^2

    @property
    def error(self) -> float:
        """Relative Frobenius error ``|dW - B A| / |dW|`` (0 for a zero delta)."""
        return math.sqrt(max(self.total - self.kept, 0.0) / self.total) if self.total > 0 else 0.0


@dataclass(frozen=True)
class LoraExport:
    """What :func:`export_lora` wrote: the directory, the file's rank and each layer's fit."""

    out_dir: Path
    r: int
    layers: dict[str, LayerFit]
    left_out: tuple[str, ...] = ()  # modules_to_save of an adapter input (full copies, not LoRA-shaped)

    @property
    def total_error(self) -> float:
        """``sqrt(sum of dropped / sum of |dW|^2)`` over all layers."""
        total = sum(f.total for f in self.layers.values())
        kept = sum(f.kept for f in self.layers.values())
        return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0

    @property
    def padded(self) -> int:
        """Zero rank components stored to give every layer the file's one rank."""
        return sum(self.r - f.rank for f in self.layers.values())

    def rows(self) -> list[dict]:
        return [{"tensor": n, "rank": f.rank, "of": f.full_rank, "rel_error": f"{f.error:.4g}"}
                for n, f in self.layers.items()]


def _pick_rank(s: Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    sq = s.double().pow(2)
    total = float(sq.sum())
    if total == 0:
        return 1
    kept = sq.cumsum(0) / total
    return max(1, min(int((kept < energy).sum()) + 1, s.numel()))


def svd_factors(dw: Tensor, *, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor, LayerFit]:
    """``(B, A, fit)`` with ``dw.reshape(out, -1) ~ B @ A``; B (out, r), A (r, prod(rest)).

    Works in fp32 (fp64 for an fp64 ``dw``); ``dw`` is not modified.
    """
    work = torch.float64 if dw.dtype == torch.float64 else torch.float32
    mat = dw.reshape(dw.shape[0], -1).to(work)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    r = _pick_rank(S, rank, energy)
    root = S[:r].sqrt()
    sq = S.double().pow(2)
    fit = LayerFit(r, S.numel(), float(sq[:r].sum()), float(sq.sum()))
    return U[:, :r] * root, root[:, None] * Vh[:r], fit


def _check_choice(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ValueError(f"export_lora: expected exactly one of rank and energy, found rank={rank}, energy={energy}")
    if rank is not None and rank < 1:
        raise ValueError(f"export_lora: expected a rank >= 1, found {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"export_lora: expected an energy in (0, 1], found {energy}")


def _as_task_vector(delta: TaskVector | Adapter | Mapping[str, Delta]) -> tuple[TaskVector, tuple[str, ...]]:
    if isinstance(delta, Adapter):
        full = tuple(p for p, m in delta.targets.items() if m == "full")
        return TaskVector.from_adapter(delta, include_full=False), full
    if isinstance(delta, TaskVector):
        return delta, ()
    if isinstance(delta, Mapping):
        return TaskVector.from_mapping(delta), ()
    raise TypeError(f"export_lora: expected a TaskVector, a mapping or an Adapter, found {type(delta).__name__}")


def _target(model: nn.Module, name: str) -> str:
    """The module path of entry ``name``, which must be the weight of a module a LoRA wraps."""
    path, _, param = name.rpartition(".")
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"expected a module {path!r} in {type(model).__name__}, found none") from None
    m = m.base if isinstance(m, DeltaLayer) else m
    if param != "weight" or not isinstance(m, _SUPPORTED):
        raise ValueError(f"{name}: a LoRA holds the weight of a Linear, Conv1D, Conv2d or Embedding; "
                         f"found {param!r} of a {type(m).__name__}")
    return path


def _set_factors(delta: LoRA, B: Tensor, A: Tensor) -> None:
    """Write matrix factors (``dW.reshape(rows, -1) = B @ A``) into a LoRA's own layout,
    zero-padded to its rank: the inverse of :meth:`LoRA.factors`."""
    r = B.shape[1]
    la, lb = delta.lora_A, delta.lora_B
    with torch.no_grad():
        la.zero_()
        lb.zero_()
        if delta.layout in ("conv1d", "embedding"):  # weights stored transposed: dW = A^T B^T
            la[:r].copy_(B.T)
            lb[:, :r].copy_(A.T)
        else:  # linear; conv2d: B (out, r, 1, 1), A (r, in, kh, kw)
            lb[:, :r].copy_(B.reshape(lb.shape[0], r, *lb.shape[2:]))
            la[:r].copy_(A.reshape(r, *la.shape[1:]))


def export_lora(delta: TaskVector | Adapter | Mapping[str, Delta], model: nn.Module, out_dir: str | os.PathLike,
                *, rank: int | None = None, energy: float | None = None) -> LoraExport:
    """Write ``delta`` as a peft LoRA adapter directory for ``model`` (see the module doc).

    Exactly one of ``rank`` (every layer, capped by its size) and ``energy`` (per layer, the
    smallest rank keeping that fraction of ``|dW|_F^2``). ``model`` is the base the delta
    applies to (its module types choose the LoRA layout; peft's config names it); it is left
    as it was. Entries are decoded one at a time; only the rank-r factors are kept.
    """
    _check_choice(rank, energy)
    tv, left_out = _as_task_vector(delta)
    if len(tv) == 0:
        raise ValueError("export_lora: expected a delta with weight entries, found none")
    paths = {name: _target(model, name) for name in tv.keys()}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    fits: dict[str, LayerFit] = {}
    for name in tv.keys():
        B, A, fits[name] = svd_factors(as_dense(tv.get(name)), rank=rank, energy=energy)
        factors[paths[name]] = (B, A)
    r = max(f.rank for f in fits.values())
    with torch.random.fork_rng(devices=[]):  # LoRA's init draws are overwritten: keep the caller's RNG
        ad = attach(model, LoraConfig(r=r, alpha=float(r), targets=tuple(factors)), name=_TMP, activate=False)
    try:
        for path, d in ad.deltas():
            _set_factors(d, *factors[path])
        export_peft(ad, out_dir)
    finally:
        detach(model, _TMP)
    return LoraExport(Path(out_dir), r, fits, left_out)
