"""Delta values: what a task vector maps a parameter name to, and how each kind is stored.

A delta value is either a plain ``torch.Tensor`` (codec ``"dense"``) or an instance of a
:class:`DeltaValue` subclass registered under a codec name with :func:`register_codec`.
The protocol is small: ``shape``, ``dtype``, ``nbytes``, ``to_dense()``, and for files
``tensors()`` + ``meta()`` out and ``from_tensors(tensors, meta)`` back. Arithmetic
(``scaled``, ``added``, ``norm``) has dense defaults that a codec overrides to stay compact
(:class:`~deltakit.taskvec.LowRank` keeps sums factored). A new kind of value (sparse,
sign + scale, quantised...) is one new file: nothing in TaskVector, the merge executor or
the file code changes.

>>> @register_codec("halved")                        # doctest: +SKIP
... class Halved(DeltaValue):
...     def __init__(self, t): self.t = t
...     shape = property(lambda self: tuple(self.t.shape))
...     dtype = property(lambda self: self.t.dtype)
...     def to_dense(self, dtype=None): return (self.t / 2).to(dtype or self.t.dtype)
...     def tensors(self): return {"t": self.t}
...     @classmethod
...     def from_tensors(cls, tensors, meta): return cls(tensors["t"])
"""
from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch

__all__ = ["DeltaValue", "Delta", "register_codec", "get_codec", "codecs", "codec_of", "as_dense",
           "encode", "decode", "scale_value", "add_values", "value_norm", "DENSE"]

DENSE = "dense"
_CODECS: dict[str, type[DeltaValue]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")
V = TypeVar("V", bound="type[DeltaValue]")


class DeltaValue(abc.ABC):
    """A task-vector entry that is not a plain tensor. Subclass it and register a codec.

    Required: ``shape`` (the parameter's shape), ``dtype`` (of ``to_dense()``),
    ``to_dense(dtype=None)``, ``tensors()`` (the parts to store, ``{part: tensor}``) and the
    classmethod ``from_tensors(tensors, meta)`` that rebuilds the value from them.
    Optional, with defaults: ``meta()`` (JSON-able extras, e.g. a scale), ``nbytes``
    (the stored parts' bytes) and the arithmetic ``scaled``, ``added``, ``norm`` (dense).
    """

    codec: ClassVar[str] = ""  # set by @register_codec

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abc.abstractmethod
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full ``dW`` with ``shape``, in ``dtype`` (default: the value's own)."""

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a file stores for this value, by part name (``[a-zA-Z0-9_]`` names)."""

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> DeltaValue:
        """Rebuild a value from what :meth:`tensors` and :meth:`meta` returned."""

    def meta(self) -> dict[str, Any]:
        """JSON-able extras stored beside the tensors (a scale, the original shape...)."""
        return {}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def scaled(self, c: float) -> Delta:
        """``c * self``; dense by default, a codec that can stay compact overrides it."""
        return self.to_dense(_work(self.dtype)) * c

    def added(self, other: Delta) -> Delta:
        """``self + other``; dense by default (the codec of a sum is not known in general)."""
        work = _work(self.dtype, other.dtype)
        return self.to_dense(work) + as_dense(other, work)

    def norm(self) -> float:
        """Frobenius norm; dense by default."""
        return float(torch.linalg.vector_norm(self.to_dense(torch.float64)))

    def __mul__(self, c: float) -> Delta:
        return self.scaled(float(c))

    __rmul__ = __mul__

    def __neg__(self) -> Delta:
        return self.scaled(-1.0)

    def __add__(self, other: object) -> Delta:
        return self.added(other) if isinstance(other, (torch.Tensor, DeltaValue)) else NotImplemented

    __radd__ = __add__

    def __sub__(self, other: object) -> Delta:
        return self + (-other)  # type: ignore[operator]

    def __rsub__(self, other: object) -> Delta:
        return (-self) + other  # type: ignore[operator]


Delta = torch.Tensor | DeltaValue


def _work(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def register_codec(name: str) -> Callable[[V], V]:
    """Class decorator: make a :class:`DeltaValue` subclass loadable from files as ``name``."""
    if not _NAME.fullmatch(name) or name == DENSE:
        raise ValueError(f"register_codec: expected a lower-case identifier other than {DENSE!r}, found {name!r}")

    def deco(cls: V) -> V:
        if not (isinstance(cls, type) and issubclass(cls, DeltaValue)):
            raise TypeError(f"register_codec({name!r}): expected a DeltaValue subclass, found {cls!r}")
        if name in _CODECS and _CODECS[name] is not cls:
            raise ValueError(f"register_codec: codec {name!r} is already registered by "
                             f"{_CODECS[name].__module__}.{_CODECS[name].__qualname__}")
        cls.codec = name
        _CODECS[name] = cls
        return cls

    return deco


def get_codec(name: str) -> type[DeltaValue]:
    try:
        return _CODECS[name]
    except KeyError:
        raise KeyError(f"expected a registered codec ({', '.join([DENSE, *sorted(_CODECS)])}), found {name!r}; "
                       f"import the module that registers it") from None


def codecs() -> list[str]:
    return [DENSE, *sorted(_CODECS)]


def codec_of(d: Delta) -> str:
    if isinstance(d, torch.Tensor):
        return DENSE
    if isinstance(d, DeltaValue) and d.codec:
        return d.codec
    raise TypeError(f"expected a tensor or a registered DeltaValue, found {type(d).__name__}")


def as_dense(d: Delta, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor for any delta value (compact values materialised)."""
    if isinstance(d, torch.Tensor):
        return d if dtype is None else d.to(dtype)
    return d.to_dense(dtype)


def encode(d: Delta) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """``(codec, parts, meta)`` of one value: what a file stores."""
    codec = codec_of(d)
    if codec == DENSE:
        return codec, {"value": d}, {}  # type: ignore[dict-item]
    return codec, d.tensors(), d.meta()  # type: ignore[union-attr]


def decode(codec: str, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Delta:
    if codec == DENSE:
        return parts["value"]
    return get_codec(codec).from_tensors(parts, meta)


def scale_value(d: Delta, c: float) -> Delta:
    return d * c if isinstance(d, torch.Tensor) else d.scaled(c)


def add_values(a: Delta, b: Delta) -> Delta:
    if isinstance(a, DeltaValue):
        return a.added(b)
    if isinstance(b, DeltaValue):
        return b.added(a)  # addition commutes, and IEEE a + b == b + a exactly
    return a + b


def value_norm(d: Delta) -> float:
    return float(torch.linalg.vector_norm(d.double())) if isinstance(d, torch.Tensor) else d.norm()
