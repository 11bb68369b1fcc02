"""TaskVector: a lazy mapping ``parameter name -> dW`` detached from any model.

Task arithmetic (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089):
``tau = theta_ft - theta_base``; models are edited by ``theta_base + sum_i lambda_i tau_i``.
Every entry is a zero-argument function returning a tensor or a :class:`LowRank`,
so arithmetic composes functions and nothing is read until a value is asked for.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from deltakit.io.files import DeltakitFileError

from ._checkpoint import LazyCheckpoint
from ._lowrank import Delta, LowRank, as_dense
from ._writer import DEFAULT_SHARD_BYTES, PlannedTensor, write_checkpoint

__all__ = ["TaskVector"]

Thunk = Callable[[], Delta]
_FORMAT = "deltakit.taskvector/1"
_LR_B, _LR_A = ".lowrank_B", ".lowrank_A"


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _add(a: Delta, b: Delta) -> Delta:
    if isinstance(a, LowRank) or isinstance(b, LowRank):
        return a + b  # LowRank handles both orders
    return a + b


def _dense_thunk(f: Thunk) -> Thunk:
    f._dense = True  # type: ignore[attr-defined]  # known to return a dense tensor
    return f


def _keep_kind(src: Thunk, f: Thunk) -> Thunk:
    return _dense_thunk(f) if getattr(src, "_dense", False) else f


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


class TaskVector:
    """Lazy ``name -> dW`` mapping with plain-Python arithmetic.

    Build with :meth:`from_checkpoints`, :meth:`from_state_dicts`, :meth:`from_mapping`
    or :meth:`load`. ``tv1 + tv2`` takes the union of names (a missing name is a zero
    delta); ``c * tv`` and ``-tv`` scale every entry. Shapes: each ``tv[name]`` has the
    shape of the parameter it edits.

    >>> base = {"w": torch.zeros(2, 2)}
    >>> ft = {"w": torch.ones(2, 2)}
    >>> tv = TaskVector.from_state_dicts(ft, base)
    >>> (0.5 * tv).apply(base)["w"]
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """

    def __init__(self, entries: Mapping[str, Thunk], shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self._entries: dict[str, Thunk] = dict(entries)
        self._shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in (shapes or {}).items()}

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
        entries: dict[str, Thunk] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        ft_keys = set(ft.keys())
        if strict and names is None:
            extra = [k for k in ft.keys() if k not in set(b.keys()) and _dtype_of(ft, k).is_floating_point]
            if extra:
                raise DeltakitFileError(f"expected every fine-tuned tensor in the base, found {extra[0]!r} "
                                        f"only in the fine-tuned model ({len(extra)} such)")
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
            entries[n] = _dense_thunk(lambda n=n, work=work: _get(ft, n, work) - _get(b, n, work))
            shapes[n] = sb
        return cls(entries, shapes)

    @classmethod
    def from_state_dicts(cls, finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                         **kw) -> TaskVector:
        """Same as :meth:`from_checkpoints` for two in-memory state dicts."""
        return cls.from_checkpoints(finetuned, base, **kw)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Thunk | torch.Tensor | LowRank]) -> TaskVector:
        """Hook for adapters: each value is a tensor, a LowRank, or a zero-arg callable returning one."""
        entries: dict[str, Thunk] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for n, v in mapping.items():
            if isinstance(v, torch.Tensor):
                t = v.detach()
                entries[n] = _dense_thunk(lambda t=t: t)
                shapes[n] = tuple(t.shape)
            elif isinstance(v, LowRank):
                entries[n] = lambda v=v: v
                shapes[n] = tuple(v.shape)
            elif callable(v):
                entries[n] = v
            else:
                raise TypeError(f"{n}: expected a tensor, LowRank or callable, found {type(v).__name__}")
        return cls(entries, shapes)

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
        """Open a task vector written by :meth:`save` (lazily; LowRank entries stay factored)."""
        ck = LazyCheckpoint(path)
        if ck.metadata.get("deltakit") != _FORMAT:
            raise DeltakitFileError(f"{path}: expected a deltakit task vector ({_FORMAT}), "
                                    f"found metadata {ck.metadata.get('deltakit')!r}")
        lowrank: dict[str, list] = json.loads(ck.metadata.get("lowrank", "{}"))
        entries: dict[str, Thunk] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for k in ck.keys():
            if k.endswith(_LR_A):
                continue
            if k.endswith(_LR_B):
                n = k[: -len(_LR_B)]
                scale, shape = lowrank[n]
                entries[n] = lambda n=n, s=scale, sh=tuple(shape): LowRank(ck.get(n + _LR_B), ck.get(n + _LR_A), s, sh)
                shapes[n] = tuple(shape)
            else:
                entries[k] = _dense_thunk(lambda k=k: ck.get(k))
                shapes[k] = ck.shape(k)
        return cls(entries, shapes)

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
        """The delta for one name (tensor or LowRank); computed now, not cached."""
        try:
            thunk = self._entries[name]
        except KeyError:
            raise KeyError(f"expected a task-vector entry named {name!r}, found none") from None
        return thunk()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.dense(name)

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return as_dense(self.get(name), dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._shapes[name] = tuple(self.get(name).shape)
        return self._shapes[name]

    def items(self) -> Iterator[tuple[str, Delta]]:
        for n in self._entries:
            yield n, self.get(n)

    def select(self, names: Iterable[str] | Callable[[str], bool]) -> TaskVector:
        keep = [n for n in self._entries if names(n)] if callable(names) else list(names)
        return TaskVector({n: self._entries[n] for n in keep}, {n: self._shapes[n] for n in keep if n in self._shapes})

    def map(self, fn: Callable[[str, Delta], Delta]) -> TaskVector:
        """A new task vector with ``fn(name, dW)`` applied lazily per entry."""
        return TaskVector({n: (lambda n=n, t=t: fn(n, t())) for n, t in self._entries.items()}, self._shapes)

    # -- arithmetic (lazy) ---------------------------------------------------
    def __add__(self, other: object) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:
            return self  # lets sum([tv1, tv2]) work
        if not isinstance(other, TaskVector):
            return NotImplemented
        entries: dict[str, Thunk] = {}
        for n in self._entries.keys() | other._entries.keys():
            a, b = self._entries.get(n), other._entries.get(n)
            if a is not None and b is not None:
                sa, sb = self._shapes.get(n), other._shapes.get(n)
                if sa is not None and sb is not None and sa != sb:
                    raise ValueError(f"{n}: expected shape {sa}, found {sb}")
                f = lambda a=a, b=b: _add(a(), b())  # noqa: E731
                entries[n] = _dense_thunk(f) if getattr(a, "_dense", False) and getattr(b, "_dense", False) else f
            else:
                entries[n] = a or b  # type: ignore[assignment]
        order = list(self._entries) + [n for n in other._entries if n not in self._entries]
        return TaskVector({n: entries[n] for n in order}, {**other._shapes, **self._shapes})

    __radd__ = __add__

    def __mul__(self, c: float) -> TaskVector:
        if not isinstance(c, (int, float)):
            return NotImplemented
        c = float(c)
        return TaskVector({n: _keep_kind(t, lambda t=t: t() * c) for n, t in self._entries.items()}, self._shapes)

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
        out = {}
        for n, d in self.items():
            out[n] = d.norm() if isinstance(d, LowRank) else float(torch.linalg.vector_norm(d.double()))
        return out

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
                            progress: bool = False) -> Path:
        """Stream ``base + scale * dW`` into a new HF checkpoint dir (atomic; one tensor in memory).

        ``dtype``: output dtype of floating tensors (default: the base's). Names the task
        vector lacks are copied unchanged; names the base lacks are an error.
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
                                copy_files_from=base_dir, progress=progress, desc="apply task vector")

    # -- saving --------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        """Write to a directory in HF layout (atomic, streamed). LowRank entries stay factored.

        ``dtype``: storage dtype for dense entries (default: as computed, usually fp32).
        """
        plan: list[PlannedTensor] = []
        factors: dict[str, LowRank] = {}
        for n in self._entries:
            if n in self._shapes and not self._maybe_lowrank(n):
                d = None
            else:
                d = self.get(n)
            if isinstance(d, LowRank):
                factors[n] = d  # factors are small by construction; keep them
                plan.append(PlannedTensor(n + _LR_B, tuple(d.B.shape), dtype or d.B.dtype))
                plan.append(PlannedTensor(n + _LR_A, tuple(d.A.shape), dtype or d.A.dtype))
            else:
                shape = self._shapes.get(n) or tuple(d.shape)  # type: ignore[union-attr]
                dt = dtype or (d.dtype if d is not None else torch.float32)
                plan.append(PlannedTensor(n, shape, dt))
            del d

        def produce(it: PlannedTensor) -> torch.Tensor:
            if it.name.endswith(_LR_B) and it.name[: -len(_LR_B)] in factors:
                return factors[it.name[: -len(_LR_B)]].B.to(it.dtype)
            if it.name.endswith(_LR_A) and it.name[: -len(_LR_A)] in factors:
                return factors[it.name[: -len(_LR_A)]].A.to(it.dtype)
            return as_dense(self.get(it.name)).to(it.dtype)

        meta = {"deltakit": _FORMAT,
                "lowrank": json.dumps({n: [f.scale, list(f.shape)] for n, f in factors.items()})}
        return write_checkpoint(path, plan, produce, max_shard_bytes=max_shard_bytes, metadata=meta)

    def _maybe_lowrank(self, name: str) -> bool:
        # Entries built from checkpoints are dense; everything else may be factored.
        return not getattr(self._entries[name], "_dense", False)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors)"
