"""Run a model with a compressed task vector attached, one dense delta at a time.

``TaskVector.apply`` / ``apply_to_checkpoint`` already stream (one entry decoded, added and
dropped before the next). This module is for *inference without merging*: keep the compact
values, and decode each target's delta only while that target runs.

Design: a compressed task vector becomes an ordinary deltakit adapter. Each target module
gets a :class:`CompressedDelta` (a core :class:`~deltakit.core.delta.WeightDelta` holding the
codec values, no parameters) inside the usual :class:`~deltakit.core.layer.DeltaLayer`, so
everything the core writes once over the delta protocol works unchanged: ``disabled``,
``set_active`` beside other adapters, ``mixed_batch`` rows, ``merge`` / ``unmerge``,
``detach``. Its ``delta(base)`` decodes the target's values (the layer adds them to the
weight for that forward and drops them), so at most one target's dense delta is alive.
Values with a compact product (:data:`COMPACT`: ``LowRank`` as two skinny matmuls, ``Sparse``
as a sparse matmul) on an ``nn.Linear`` get :class:`CompactDelta`, whose ``residual`` adds
``x @ dW^T`` without forming ``dW`` at all (the core still folds ``dW`` into ``W`` when that is
cheaper: no autograd and many tokens, see ``DeltaLayer._fold_is_cheaper``).

The adapter uses method name ``compressed``, which is deliberately not in the method
registry (it is built from values, not from a config), so it cannot be saved as an adapter
directory: save the task vector itself (``tv.save``) and attach it again after loading.

>>> import torch                                                        # doctest: +SKIP
>>> tv = TaskVector.load("sst2-topk")                                    # doctest: +SKIP
>>> ad = attach_compressed(model, tv, name="sst2")                       # doctest: +SKIP
>>> with torch.no_grad(): logits = model(ids).logits                     # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, _check_tied, adapters, insert
from ..core.delta import WeightDelta
from ..core.layer import DeltaLayer
from ..core.registry import DeltaConfig, MethodSpec
from ..taskvec import Delta, LowRank, TaskVector, as_dense, codec_of
from .codecs.topk import Sparse

__all__ = ["attach_compressed", "CompressedDelta", "CompactDelta", "CompressedConfig", "COMPACT"]

METHOD = "compressed"


@dataclass(frozen=True)
class CompressedConfig(DeltaConfig):
    """What an adapter made by :func:`attach_compressed` records: its targets (no knobs)."""

    method: ClassVar[str] = METHOD


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CompressedDelta(WeightDelta):
    """A target's codec values (``{parameter: value}``); ``delta`` decodes them on use.

    The values are plain attributes, not parameters or buffers: frozen, compact, and kept
    on the device they were loaded to (each decoded ``dW`` is moved to the weight's device).
    """

    def __init__(self, values: Mapping[str, Delta]):
        super().__init__()
        self.values = dict(values)

    def delta(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: as_dense(v, _work(v.dtype)).to(base[k].device) for k, v in self.values.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {codec_of(v)} {tuple(v.shape)}" for k, v in self.values.items())


def _lowrank_product(d: LowRank, x: Tensor) -> Tensor:
    """``x @ (s B A)^T`` as ``((x @ A^T) s) @ B^T``: (..., in) -> (..., r) -> (..., out)."""
    work = _work(d.dtype)
    return ((x.to(work) @ d.A.to(x.device, work).T) * d.scale) @ d.B.to(x.device, work).T


def _sparse_product(d: Sparse, x: Tensor) -> Tensor:
    """``x @ dW^T`` with ``dW`` a COO matrix of its kept entries (positions are row-major sorted)."""
    out_f, in_f = d.shape
    work = _work(d.dtype)
    pos = d.positions.to(x.device)
    idx = torch.stack([pos // in_f, pos % in_f])
    mat = torch.sparse_coo_tensor(idx, d.values.to(x.device, work) * d.scale, (out_f, in_f),
                                  is_coalesced=True, check_invariants=False)
    flat = x.reshape(-1, in_f).to(work)                          # (N, in)
    return torch.sparse.mm(mat, flat.T).T.reshape(*x.shape[:-1], out_f)


#: value type -> ``product(value, x) = x @ dW^T`` for a Linear's ``(out, in)`` weight delta. Exact
#: types only: a subclass may decode differently. A codec with a compact product adds a line here.
COMPACT: dict[type, Callable[[Delta, Tensor], Tensor]] = {LowRank: _lowrank_product, Sparse: _sparse_product}


class CompactDelta(CompressedDelta):
    """A Linear's weight delta applied from its compact form: ``out = base(x) + x @ dW^T``."""

    def __init__(self, values: Mapping[str, Delta]):
        super().__init__(values)
        self._product = COMPACT[type(self.values["weight"])]

    def residual(self, base: nn.Module, x: Tensor) -> Tensor:
        return self._product(self.values["weight"], x)


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise KeyError(f"expected a module {path!r} in {type(model).__name__}, found none") from None
    return m.base if isinstance(m, DeltaLayer) else m


def _group(model: nn.Module, tv: TaskVector) -> dict[str, dict[str, Delta]]:
    """``{module path: {parameter: value}}``, every name and shape checked against ``model``."""
    out: dict[str, dict[str, Delta]] = {}
    for name in tv.keys():
        path, _, param = name.rpartition(".")
        params = dict(_module(model, path).named_parameters(recurse=False))
        if param not in params:
            raise KeyError(f"expected parameter {name!r} in {type(model).__name__}, found none")
        value = tv.get(name)
        if tuple(value.shape) != tuple(params[param].shape):
            raise ValueError(f"{name}: expected a delta of shape {tuple(params[param].shape)}, "
                             f"found {tuple(value.shape)}")
        out.setdefault(path, {})[param] = value
    return out


def _delta_for(base: nn.Module, values: dict[str, Delta]) -> CompressedDelta:
    w = values.get("weight")
    if isinstance(base, nn.Linear) and set(values) == {"weight"} and type(w) in COMPACT and len(w.shape) == 2:
        return CompactDelta(values)
    return CompressedDelta(values)


def attach_compressed(model: nn.Module, tv: TaskVector, name: str = METHOD, *, activate: bool = True) -> Adapter:
    """Attach task vector ``tv`` (any codecs) to ``model`` as adapter ``name`` (see the module doc).

    Every entry names a parameter of ``model`` (``<module path>.<parameter>``) with its shape;
    all are checked and built before the model is touched. Values are read from ``tv`` once
    (compact codecs stay compact; dense entries are held dense, as ``tv`` holds them).
    """
    if not isinstance(tv, TaskVector):
        raise TypeError(f"attach_compressed: expected a TaskVector, found {type(tv).__name__}")
    if len(tv) == 0:
        raise ValueError("attach_compressed: expected a task vector with entries, found an empty one")
    if not name or "." in name:
        raise ValueError(f"adapter name must be non-empty without '.', found {name!r}")
    if name in adapters(model):
        raise ValueError(f"an adapter named {name!r} is already attached; detach it or pick another name")
    groups = _group(model, tv)
    _check_tied(model, list(groups))  # an unmerged delta on a tied weight would reach one of its users
    deltas = {p: (METHOD, _delta_for(_module(model, p), v)) for p, v in groups.items()}
    config = CompressedConfig(targets=tuple(groups))
    spec = MethodSpec(METHOD, CompressedDelta, CompressedConfig, "weight", paper="",
                      description="a task vector's codec values, decoded per target on use")
    return insert(model, name, config, spec, (None, deltas), activate=activate)
