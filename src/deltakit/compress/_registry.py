"""Registry of compressors: ``@register_compressor(name, config=..., paper=...)``.

A compressor is a pure function ``encode(dW, cfg) -> value`` from one dense weight delta to a
:class:`CompressedValue` (a registered :class:`~deltakit.taskvec.DeltaValue` codec), so a
compressed delta is read by everything that reads a task vector: apply, merge, export.
Decoding is the value's own ``to_dense()``: files name the value's codec, never the encoder.

``cfg`` is the compressor's frozen dataclass config, its fields declared with
:func:`deltakit.core.fields.knob` (one declaration serves validation, the CLI and ``--list``).
``encode`` never mutates ``dW`` and works in fp32 or wider whatever ``dW``'s dtype.
A compressor may also declare ``bits(cfg, shape) -> float``: the bits per parameter its
output takes for a tensor of ``shape`` (the size-budget allocator plans with it before
encoding); without it the allocator encodes to find out.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.fields import ConfigError, check_fields, coerce_fields, fields_of
from ..taskvec import DeltaValue

__all__ = ["Compressor", "register_compressor", "get_compressor", "list_compressors", "build_compressor_config",
           "compress_tensor", "CompressedValue", "CompressConfigError"]


class CompressConfigError(ConfigError):
    """A compressor's name or knob is unknown, ill-typed or out of range."""


class CompressedValue(DeltaValue):
    """A delta value produced by a compressor: it knows the shape and dtype it decodes to.

    Subclasses keep the original ``shape`` and ``dtype`` (``to_dense()`` returns that dtype by
    default) and store them through :meth:`meta`; ``bits_per_param`` is counted from the
    stored parts, so it is what the file holds, not what a paper's formula says.
    """

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(1, self.numel)


@dataclass(frozen=True)
class Compressor:
    name: str
    encode: Callable[[torch.Tensor, Any], DeltaValue]
    config: type
    paper: str
    bits: Callable[[Any, tuple[int, ...]], float] | None = None
    doc: str = ""

    def describe(self) -> list[str]:
        """``--list`` lines: name, paper, then one line per knob."""
        head = f"{self.name}: {self.doc}" + (f" [{self.paper}]" if self.paper else "")
        return [head, *(f"    --{s.name} {s.default!r}: {s.doc} ({s.describe()})" for s in fields_of(self.config))]


_COMPRESSORS: dict[str, Compressor] = {}


def register_compressor(name: str, *, config: type, paper: str = "",
                        bits: Callable[[Any, tuple[int, ...]], float] | None = None
                        ) -> Callable[[Callable], Callable]:
    """Decorator for ``encode(dW, cfg) -> CompressedValue``; its docstring's first line is the
    one-line description ``deltakit compress --list`` shows."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register_compressor({name!r}): expected a dataclass config, found {config!r}")

    def deco(fn: Callable) -> Callable:
        if name in _COMPRESSORS and _COMPRESSORS[name].encode is not fn:
            raise ValueError(f"register_compressor: {name!r} is already registered by "
                             f"{_COMPRESSORS[name].encode.__module__}")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _COMPRESSORS[name] = Compressor(name, fn, config, paper, bits, doc)
        return fn

    return deco


def _load_builtins() -> None:
    from . import codecs  # noqa: F401  (importing registers every built-in compressor)


def get_compressor(name: str) -> Compressor:
    _load_builtins()
    try:
        return _COMPRESSORS[name]
    except KeyError:
        raise CompressConfigError(f"expected a compressor ({', '.join(sorted(_COMPRESSORS))}), "
                                  f"found {name!r}") from None


def list_compressors() -> list[Compressor]:
    _load_builtins()
    return [_COMPRESSORS[n] for n in sorted(_COMPRESSORS)]


def build_compressor_config(name: str, values: Mapping[str, Any] | None = None, where: str = "compress") -> Any:
    """The compressor's config from plain values (CLI strings, JSON) through the one coercion of
    :mod:`deltakit.core.fields`; a bad knob is a one-line :class:`CompressConfigError`."""
    c = get_compressor(name)
    try:
        cfg = c.config(**coerce_fields(c.config, dict(values or {}), where, owner=name))
        check_fields(cfg)  # ranges too (a config without the Checked mixin would take density=2)
        return cfg
    except (ValueError, TypeError) as e:
        raise CompressConfigError(f"{where}: {e}") from None


def compress_tensor(dw: torch.Tensor, name: str, cfg: Any = None, **knobs: Any) -> DeltaValue:
    """Encode one dense delta with compressor ``name`` (config ``cfg`` or knobs by keyword)."""
    if cfg is None:
        cfg = build_compressor_config(name, knobs)
    elif knobs:
        raise TypeError("compress_tensor: give either cfg or knobs, not both")
    if not isinstance(dw, torch.Tensor) or not dw.is_floating_point():
        raise TypeError(f"compress_tensor: expected a floating-point tensor, found "
                        f"{getattr(dw, 'dtype', type(dw).__name__)}")
    return get_compressor(name).encode(dw, cfg)
