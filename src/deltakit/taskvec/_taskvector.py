"""TaskVector: a lazy mapping ``parameter name -> dW`` detached from any model.

Task arithmetic (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089):
``tau = theta_ft - theta_base``; models are edited by ``theta_base + sum_i lambda_i tau_i``.
Every entry is a zero-argument function returning a delta value (a tensor, a
:class:`LowRank`, or any registered :class:`DeltaValue`), so arithmetic composes functions
and nothing is read until a value is asked for.

Files (``save`` / ``load``): a HF-layout safetensors directory whose header metadata holds
``deltakit = deltakit.taskvector/2`` and ``entries``, a JSON manifest giving every entry's
codec, shape, stored tensors and codec metadata. A dense entry is stored under its own name
(so a dense task vector is also a plain checkpoint); part ``p`` of an entry ``n`` with codec
``c`` is stored as ``n.c_p``. Version 1 files (dense + ``lowrank`` metadata) still load.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from deltakit.io.files import DeltakitFileError
from deltakit.io.tensors import DEFAULT_SHARD_BYTES, LazyCheckpoint, PlannedTensor, write_checkpoint

from ._lowrank import LowRank
from ._values import (DENSE, Delta, DeltaValue, add_values, as_dense, decode, encode, get_codec, scale_value,
                      value_norm)

__all__ = ["TaskVector"]

Thunk = Callable[[], Delta]
_FORMAT_V1 = "deltakit.taskvector/1"
_FORMAT = "deltakit.taskvector/2"
_LR_B, _LR_A = ".lowrank_B", ".lowrank_A"  # version 1 names (the v2 rule gives the same)


@dataclass(frozen=True)
class _Entry:
    """One lazy entry and what is known about it without computing it."""

    thunk: Thunk
    shape: tuple[int, ...] | None = None
    codec: str | None = None            # DENSE when known to give a plain tensor
    dtype: torch.dtype | None = None    # known for dense entries read from files / given as tensors


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _source(x: str | os.PathLike | LazyCheckpoint | Mapping[str, torch.Tensor]):
    if isinstance(x, (str, os.PathLike)):
        return LazyCheckpoint(x)
    return x


def _shape_of(src, name: str) -> tuple[int, ...]:
    return tuple(src.shape(name)) if isinstance(src, LazyCheckpoint) else tuple(src[name].shape)


def _dtype_of(src, name: str) -> torch.dtype:
    return src.dtype(name) if isinstance(src, LazyCheckpoint) else src[name].dtype


def _get(src, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(src, LazyCheckpoint):
        return src.get(name, dtype)
    return src[name].detach().to("cpu", dtype)


def _entry_of(name: str, v: Thunk | Delta) -> _Entry:
    if isinstance(v, torch.Tensor):
        t = v.detach()
        return _Entry(lambda: t, tuple(t.shape), DENSE, t.dtype)
    if isinstance(v, DeltaValue):
        return _Entry(lambda: v, tuple(v.shape), v.codec or None)
    if callable(v):
        return _Entry(v)
    raise TypeError(f"{name}: expected a tensor, a DeltaValue or a callable, found {type(v).__name__}")


def _v1_manifest(ck: LazyCheckpoint) -> dict[str, dict[str, Any]]:
    """A version 1 file's entries in the version 2 manifest form."""
    lowrank: dict[str, list] = json.loads(ck.metadata.get("lowrank", "{}"))
    out: dict[str, dict[str, Any]] = {}
    for k in ck.keys():
        if k.endswith(_LR_B):
            n = k[: -len(_LR_B)]
            scale, shape = lowrank[n]
            out[n] = {"codec": "lowrank", "shape": shape, "tensors": {"B": k, "A": n + _LR_A},
                      "meta": {"scale": scale, "shape": shape}}
        elif not k.endswith(_LR_A):
            out[k] = {"codec": DENSE, "shape": list(ck.shape(k)), "tensors": {"value": k}}
    return out


def _manifest(ck: LazyCheckpoint, path) -> dict[str, dict[str, Any]]:
    fmt = ck.metadata.get("deltakit")
    if fmt == _FORMAT_V1:
        return _v1_manifest(ck)
    if fmt != _FORMAT:
        raise DeltakitFileError(f"{path}: expected a deltakit task vector ({_FORMAT} or {_FORMAT_V1}), "
                                f"found metadata {fmt!r}")
    try:
        entries = json.loads(ck.metadata["entries"])
    except (KeyError, json.JSONDecodeError) as e:
        raise DeltakitFileError(f"{path}: expected a JSON 'entries' manifest in the metadata, found {e}") from None
    for n, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("codec"), str) and isinstance(e.get("shape"), list)
                and isinstance(e.get("tensors"), dict)):
            raise DeltakitFileError(f"{path}: entry {n!r} expected codec, shape and tensors, found {e}")
        missing = [k for k in e["tensors"].values() if k not in ck]
        if e["codec"] == DENSE and "value" not in e["tensors"]:
            missing = [f"{n} (its dense 'value' part)"]
        if missing:
            raise DeltakitFileError(f"{path}: entry {n!r} expected stored tensor {missing[0]!r}, found none")
        if e["codec"] != DENSE:
            try:
                get_codec(e["codec"])  # an unknown codec fails at load, not at first use
            except KeyError as err:
                raise DeltakitFileError(f"{path}: entry {n!r}: {err.args[0]}") from None
    return entries


def _loaded_entry(ck: LazyCheckpoint, e: Mapping[str, Any]) -> _Entry:
    codec, parts, meta = e["codec"], dict(e["tensors"]), e.get("meta", {})

    def thunk() -> Delta:
        return decode(codec, {p: ck.get(k) for p, k in parts.items()}, meta)
    dtype = ck.dtype(parts["value"]) if codec == DENSE else None
    return _Entry(thunk, tuple(e["shape"]), codec, dtype)


class TaskVector:
    """Lazy ``name -> dW`` mapping with plain-Python arithmetic.

    Build with :meth:`from_checkpoints`, :meth:`from_state_dicts`, :meth:`from_mapping`
    or :meth:`load`. ``tv1 + tv2`` takes the union of names (a missing name is a zero
    delta); ``c * tv`` and ``-tv`` scale every entry. Shapes: each ``tv[name]`` has the
    shape of the parameter it edits. Entries may be any delta value (see
    :class:`DeltaValue`); arithmetic keeps LowRank factored and goes through ``to_dense()``
    for codecs that do not say otherwise.

    >>> base = {"w": torch.zeros(2, 2)}
    >>> ft = {"w": torch.ones(2, 2)}
    >>> tv = TaskVector.from_state_dicts(ft, base)
    >>> (0.5 * tv).apply(base)["w"]
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """

    def __init__(self, entries: Mapping[str, Thunk], shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        shapes = shapes or {}
        self._entries: dict[str, _Entry] = {
            n: _Entry(t, tuple(shapes[n]) if n in shapes else None) for n, t in entries.items()}

    @classmethod
    def _of(cls, entries: Mapping[str, _Entry]) -> TaskVector:
        tv = cls({})
        tv._entries = dict(entries)
        return tv

    # -- construction -------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, finetuned, base, *, dtype: torch.dtype = torch.float32,
                         names: Iterable[str] | None = None, strict: bool = True) -> TaskVector:
        """``finetuned - base`` for every floating-point tensor both hold.

        ``finetuned`` / ``base``: HF checkpoint dirs, ``.safetensors`` files, LazyCheckpoints
        or state dicts. ``strict``: a float tensor present in only one of them is an error
        (otherwise skipped). Shapes must agree. Integer / bool tensors are not deltas: skipped.
        """
        ft, b = _source(finetuned), _source(base)
        wanted = list(names) if names is not None else list(b.keys())
        if strict and names is None:
            extra = [k for k in ft.keys() if k not in set(b.keys()) and _dtype_of(ft, k).is_floating_point]
            if extra:
                raise DeltakitFileError(f"expected every fine-tuned tensor in the base, found {extra[0]!r} "
                                        f"only in the fine-tuned model ({len(extra)} such)")
        ft_keys = set(ft.keys())
        entries: dict[str, _Entry] = {}
        for n in wanted:
            if n not in ft_keys:
                if strict and _dtype_of(b, n).is_floating_point:
                    raise DeltakitFileError(f"expected tensor {n!r} in the fine-tuned model, found none")
                continue
            if not (_dtype_of(b, n).is_floating_point and _dtype_of(ft, n).is_floating_point):
                continue
            sb, sf = _shape_of(b, n), _shape_of(ft, n)
            if sb != sf:
                raise DeltakitFileError(f"{n}: expected fine-tuned shape {sb} (the base's), found {sf}")
            work = dtype if dtype is not None else _work_dtype(_dtype_of(b, n), _dtype_of(ft, n))
            entries[n] = _Entry(lambda n=n, work=work: _get(ft, n, work) - _get(b, n, work), sb, DENSE, work)
        return cls._of(entries)

    @classmethod
    def from_state_dicts(cls, finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                         **kw) -> TaskVector:
        """Same as :meth:`from_checkpoints` for two in-memory state dicts."""
        return cls.from_checkpoints(finetuned, base, **kw)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Thunk | Delta]) -> TaskVector:
        """Hook for adapters: each value is a tensor, a delta value (LowRank or any registered
        codec), or a zero-arg callable returning one."""
        return cls._of({n: _entry_of(n, v) for n, v in mapping.items()})

    @classmethod
    def from_adapter(cls, adapter, *, include_full: bool = True) -> TaskVector:
        """An attached adapter as a task vector keyed by the plain model's parameter names
        (``encoder.layer.0.attention.self.query.weight``).

        Deltas that say ``factors()`` (LoRA family) stay factored as ``LowRank``; the rest
        are dense ``dW``. ``include_full=False`` leaves out ``modules_to_save`` (task-specific
        heads, which merging usually keeps per task).
        """
        from deltakit.core.delta import WeightDelta

        entries: dict = {}
        for path, layer in adapter.layers(include_full=True):
            delta = layer.deltas[adapter.name]
            if not isinstance(delta, WeightDelta) or (adapter.targets[path] == "full" and not include_full):
                continue
            factors = delta.factors()
            if factors is not None:
                B, A, scale, shape = factors
                entries[f"{path}.weight"] = LowRank(B.detach().float().clone(), A.detach().float().clone(),
                                                    float(scale), tuple(shape))
                continue
            for k, dw in layer.weight_delta([adapter.name]).items():
                entries[f"{path}.{k}"] = dw.detach().clone()
        return cls.from_mapping(entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        """Open a task vector written by :meth:`save`, lazily: only headers are read now, each
        entry's tensors when it is asked for; every entry comes back in its codec (LowRank
        stays factored). Version 1 files load too."""
        ck = LazyCheckpoint(path)
        return cls._of({n: _loaded_entry(ck, e) for n, e in _manifest(ck, path).items()})

    # -- mapping API ---------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Delta:
        """The delta value for one name (tensor, LowRank, ...); computed now, not cached."""
        try:
            entry = self._entries[name]
        except KeyError:
            raise KeyError(f"expected a task-vector entry named {name!r}, found none") from None
        return entry.thunk()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.dense(name)

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return as_dense(self.get(name), dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._entries:
            raise KeyError(f"expected a task-vector entry named {name!r}, found none")
        entry = self._entries[name]
        if entry.shape is None:
            entry = self._entries[name] = replace(entry, shape=tuple(self.get(name).shape))
        return entry.shape  # type: ignore[return-value]

    def items(self) -> Iterator[tuple[str, Delta]]:
        for n in self._entries:
            yield n, self.get(n)

    def select(self, names: Iterable[str] | Callable[[str], bool]) -> TaskVector:
        keep = [n for n in self._entries if names(n)] if callable(names) else list(names)
        return TaskVector._of({n: self._entries[n] for n in keep})

    def map(self, fn: Callable[[str, Delta], Delta]) -> TaskVector:
        """A new task vector with ``fn(name, dW)`` applied lazily per entry."""
        return TaskVector._of({n: _Entry(lambda n=n, t=e.thunk: fn(n, t()), e.shape)
                               for n, e in self._entries.items()})

    # -- arithmetic (lazy) ---------------------------------------------------
    def __add__(self, other: object) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:
            return self  # lets sum([tv1, tv2]) work
        if not isinstance(other, TaskVector):
            return NotImplemented
        order = list(self._entries) + [n for n in other._entries if n not in self._entries]
        return TaskVector._of({n: self._sum_entry(n, self._entries.get(n), other._entries.get(n)) for n in order})

    __radd__ = __add__

    @staticmethod
    def _sum_entry(n: str, a: _Entry | None, b: _Entry | None) -> _Entry:
        if a is None or b is None:
            return a or b  # type: ignore[return-value]
        if a.shape is not None and b.shape is not None and a.shape != b.shape:
            raise ValueError(f"{n}: expected shape {a.shape}, found {b.shape}")
        dense = a.codec == DENSE and b.codec == DENSE
        dtype = torch.promote_types(a.dtype, b.dtype) if dense and a.dtype and b.dtype else None
        return _Entry(lambda: add_values(a.thunk(), b.thunk()), a.shape or b.shape, DENSE if dense else None, dtype)

    def __mul__(self, c: float) -> TaskVector:
        if not isinstance(c, (int, float)):
            return NotImplemented
        c = float(c)
        return TaskVector._of({n: _Entry(lambda t=e.thunk: scale_value(t(), c), e.shape,
                                         DENSE if e.codec == DENSE else None, e.dtype if e.codec == DENSE else None)
                               for n, e in self._entries.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> TaskVector:
        return self * (1.0 / c)

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self + (-other)

    # -- statistics ----------------------------------------------------------
    def norms(self) -> dict[str, float]:
        """Per-tensor L2 (Frobenius) norm; LowRank entries without forming B @ A."""
        return {n: value_norm(d) for n, d in self.items()}

    def norm(self) -> float:
        """Global L2 norm ``sqrt(sum_name |dW_name|^2)``."""
        return math.sqrt(sum(v * v for v in self.norms().values()))

    def sparsity(self, atol: float = 0.0) -> float:
        """Fraction of entries with ``|dW| <= atol`` over all tensors."""
        zero = total = 0
        for _, d in self.items():
            d = as_dense(d)
            zero += int((d.abs() <= atol).sum())
            total += d.numel()
        return zero / total if total else 0.0

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-tensor norm, mean, std, max |dW| and sparsity (exact zeros)."""
        out = {}
        for n, d in self.items():
            d = as_dense(d).double()
            out[n] = {"norm": float(torch.linalg.vector_norm(d)), "mean": float(d.mean()),
                      "std": float(d.std()) if d.numel() > 1 else 0.0,
                      "max_abs": float(d.abs().max()) if d.numel() else 0.0,
                      "sparsity": float((d == 0).double().mean()) if d.numel() else 0.0}
        return out

    def dot(self, other: TaskVector) -> float:
        total = 0.0
        for n in self._entries.keys() & other._entries.keys():
            total += float((as_dense(self.get(n)).double() * as_dense(other.get(n)).double()).sum())
        return total

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity of the flattened task vectors: ``<a, b> / (|a| |b|)``."""
        na, nb = self.norm(), other.norm()
        return self.dot(other) / (na * nb) if na and nb else 0.0

    # -- applying ------------------------------------------------------------
    def to_low_rank(self, rank: int, *, min_dim: int = 2) -> tuple[TaskVector, dict[str, float]]:
        """Re-factorise every matrix-shaped entry to rank ``rank`` (truncated SVD).

        Returns the factored task vector and, per name, the relative Frobenius error
        ``|dW - approx| / |dW|`` (0.0 where the entry already had rank <= ``rank``).
        Entries with fewer than ``min_dim`` dimensions (biases, norms) stay dense.
        Use after a method that needs dense deltas (TIES, DARE...) to ship the merge
        as a LoRA-sized adapter again.
        """
        out: dict[str, Delta] = {}
        errors: dict[str, float] = {}
        for name, d in self.items():
            if isinstance(d, LowRank) and d.rank <= rank:
                out[name], errors[name] = d, 0.0
                continue
            dense = as_dense(d)
            if dense.dim() < min_dim:
                out[name] = dense
                continue
            out[name], errors[name] = LowRank.from_dense(dense, rank)
        return TaskVector.from_mapping(out), errors

    def apply(self, target, scale: float = 1.0):
        """Add ``scale * dW`` to a model (in place, returned) or a state dict (new dict returned).

        A name missing from the target, or a shape mismatch, is an error.
        """
        if isinstance(target, torch.nn.Module):
            params = dict(target.named_parameters())
            params.update(dict(target.named_buffers()))
            with torch.no_grad():
                for n, d in self.items():
                    p = self._check_target(params, n, d)
                    p.copy_((p.to(_work_dtype(p.dtype)) + scale * as_dense(d).to(p.device)).to(p.dtype))
            return target
        out = dict(target)
        for n, d in self.items():
            p = self._check_target(out, n, d)
            out[n] = (p.to(_work_dtype(p.dtype)) + scale * as_dense(d).to(p.device)).to(p.dtype)
        return out

    @staticmethod
    def _check_target(params: Mapping[str, torch.Tensor], n: str, d: Delta) -> torch.Tensor:
        if n not in params:
            raise KeyError(f"expected parameter {n!r} in the target, found none")
        p = params[n]
        if tuple(p.shape) != tuple(d.shape):
            raise ValueError(f"{n}: expected a delta of shape {tuple(p.shape)}, found {tuple(d.shape)}")
        return p

    def apply_to_checkpoint(self, base_dir: str | os.PathLike, out_dir: str | os.PathLike, scale: float = 1.0,
                            *, dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                            progress: bool = False, kind: str | None = None) -> Path:
        """Stream ``base + scale * dW`` into a new HF checkpoint dir (atomic; one tensor in memory).

        ``dtype``: output dtype of floating tensors (default: the base's). Names the task
        vector lacks are copied unchanged; names the base lacks are an error. ``kind`` marks
        the output as a deltakit output of that kind (``--overwrite`` may then replace it).
        """
        base = LazyCheckpoint(base_dir)
        missing = [n for n in self._entries if n not in base]
        if missing:
            raise DeltakitFileError(f"expected {missing[0]!r} in base checkpoint {base_dir}, found none")
        plan = [PlannedTensor(n, base.shape(n), dtype if dtype is not None and base.dtype(n).is_floating_point
                              else base.dtype(n)) for n in base.keys()]

        def produce(it: PlannedTensor) -> torch.Tensor:
            if it.name not in self._entries:
                return base.get(it.name).to(it.dtype)
            w = base.get(it.name, _work_dtype(base.dtype(it.name)))
            d = as_dense(self.get(it.name), w.dtype)
            if tuple(d.shape) != tuple(w.shape):
                raise DeltakitFileError(f"{it.name}: expected delta shape {tuple(w.shape)}, found {tuple(d.shape)}")
            return w.add_(d, alpha=scale).to(it.dtype)

        return write_checkpoint(out_dir, plan, produce, max_shard_bytes=max_shard_bytes,
                                copy_files_from=base_dir, progress=progress, desc="apply task vector", kind=kind)

    # -- saving --------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        """Write to a directory in HF layout (atomic, streamed); every entry keeps its codec.

        ``dtype``: storage dtype of floating-point tensors (dense entries and the floating
        parts of compact values; integer parts such as quantised codes keep theirs).
        Default: as computed. Dense entries are computed when written, one at a time;
        compact values are computed while planning and held until written (small by design).
        """
        plan: list[PlannedTensor] = []
        held: dict[str, torch.Tensor] = {}
        manifest: dict[str, dict[str, Any]] = {}
        for n in self._entries:
            manifest[n] = self._plan_entry(n, dtype, plan, held)

        def produce(it: PlannedTensor) -> torch.Tensor:
            if it.name in held:
                return held.pop(it.name).to(it.dtype)
            return as_dense(self.get(it.name)).to(it.dtype)

        meta = {"deltakit": _FORMAT, "entries": json.dumps(manifest, separators=(",", ":"))}
        return write_checkpoint(path, plan, produce, max_shard_bytes=max_shard_bytes, metadata=meta)

    def _plan_entry(self, n: str, dtype: torch.dtype | None, plan: list[PlannedTensor],
                    held: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Add entry ``n``'s stored tensors to ``plan`` -> its manifest record."""
        e = self._entries[n]
        if e.codec == DENSE and e.shape is not None and e.dtype is not None:
            plan.append(PlannedTensor(n, e.shape, dtype or e.dtype))  # known without computing it
            return {"codec": DENSE, "shape": list(e.shape), "tensors": {"value": n}}
        d = self.get(n)
        codec, parts, meta = encode(d)
        if codec == DENSE:  # computed again when written: memory stays one tensor
            plan.append(PlannedTensor(n, tuple(d.shape), dtype or d.dtype))
            return {"codec": DENSE, "shape": list(d.shape), "tensors": {"value": n}}
        stored: dict[str, str] = {}
        for p, t in parts.items():
            key = stored[p] = f"{n}.{codec}_{p}"
            t = t.detach()
            plan.append(PlannedTensor(key, tuple(t.shape), dtype if dtype and t.is_floating_point() else t.dtype))
            held[key] = t
        return {"codec": codec, "shape": list(d.shape), "tensors": stored, "meta": meta}

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors)"
