"""Config fields declared once: type, range or choices, documentation.

Every method config (PEFT and merge) is a frozen dataclass whose fields are declared
with :func:`knob`::

    @dataclass(frozen=True)
    class LoraConfig(DeltaConfig):
        r: int = knob(8, ge=1, log=True, doc="rank of the update")
        init: Literal["kaiming", "gaussian"] = knob("kaiming", doc="init of A")

The type (and, for a ``Literal``, the choices) comes from the annotation; the range,
the log-scale hint and the documentation from the knob. One declaration serves
everyone: :func:`check_fields` validates an instance at construction (a one-line
:class:`ConfigError` naming the field, the expected range and the value found),
:func:`coerce` turns CLI strings and YAML values into the declared type, and
:func:`fields_of` lists :class:`FieldSpec` rows for a search space or a help page.

A subclass that only changes a default re-declares the field with a plain value
(``density: float = 0.2``): its range and doc are inherited from the nearest base
class that declared it with a knob.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ConfigError", "knob", "FieldSpec", "fields_of", "declared", "check_fields", "coerce", "coerce_fields",
           "Checked"]

_KEY = "deltakit"


class ConfigError(ValueError):
    """A config field has a value outside what the method accepts."""


@dataclass(frozen=True)
class _Knob:
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    log: bool
    doc: str
    per_model: bool


def knob(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, log: bool = False, per_model: bool = False, doc: str) -> Any:
    """A dataclass field with its declaration: bounds (``ge``/``gt``, ``le``/``lt``), ``log``
    (a search samples it on a log scale), ``per_model`` (a merge field with one value per
    input model, a tuple) and ``doc``. Bounds apply to every element of a tuple value."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("knob: give at most one lower bound (ge / gt) and one upper bound (le / lt)")
    k = _Knob(ge if gt is None else gt, le if lt is None else lt, gt is not None, lt is not None, log, doc,
              per_model)
    return dataclasses.field(default=default, metadata={_KEY: k})


@dataclass(frozen=True)
class FieldSpec:
    """One declared field, as a search space or a help page reads it.

    ``type`` is the annotation (``int``, ``float | None``, ``tuple[str, ...]``, ...);
    ``low`` / ``high`` bound numbers (inclusive unless ``low_open`` / ``high_open``);
    ``choices`` lists a ``Literal``'s values; ``log``: sample on a log scale."""

    name: str
    type: Any
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    log: bool = False
    doc: str = ""
    low_open: bool = False
    high_open: bool = False
    per_model: bool = False

    def describe(self) -> str:
        """``"an integer >= 1"``, ``"a number in [0, 1)"``, ``"one of ['a', 'b']"``."""
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if _scalar(self.type) not in (int, float):
            return _type_text(self.type)
        what = "an integer" if _scalar(self.type) is int else "a number"
        lo, hi = self.low, self.high
        if hi is None and (lo == 0 and self.low_open or lo == 1 and what == "an integer" and not self.low_open):
            return f"a positive {what.split()[-1]}"
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.low_open else '['}{_num(lo)}, {_num(hi)}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.low_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{what} {'<' if self.high_open else '<='} {_num(hi)}"
        return what

    @property
    def item_type(self) -> Any:
        """The type of one value: ``float | tuple[float, ...] | None`` -> float (a per-model entry)."""
        return _scalar(self.type)

    def contains(self, v: float) -> bool:
        if self.low is not None and (v < self.low or self.low_open and v == self.low):
            return False
        return not (self.high is not None and (v > self.high or self.high_open and v == self.high))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _declaration(cls: type, name: str) -> _Knob | None:
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and _KEY in f.metadata:
            return f.metadata[_KEY]
    return None


def _arms(tp: Any) -> tuple[Any, ...]:
    """The members of a union (``X | Y`` or ``Optional``), else ``(tp,)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _scalar(tp: Any) -> Any:
    """The numeric / element type under unions and tuples: ``float | tuple[float, ...] | None`` -> float."""
    for a in _arms(tp):
        if typing.get_origin(a) is tuple:
            a = (typing.get_args(a) or (Any,))[0]
        if a is not type(None):
            return a
    return Any


def _choices(tp: Any) -> tuple | None:
    for a in _arms(tp):
        if typing.get_origin(a) is Literal:
            return typing.get_args(a)
    return None


def fields_of(config_cls: type) -> list[FieldSpec]:
    """The declared fields of a config class, in order (an undeclared field has an empty doc)."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        k = _declaration(config_cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        spec = dict(name=f.name, type=hints[f.name], default=default, choices=_choices(hints[f.name]))
        if k is not None:
            spec.update(low=k.low, high=k.high, low_open=k.low_open, high_open=k.high_open, log=k.log, doc=k.doc,
                        per_model=k.per_model)
        out.append(FieldSpec(**spec))
    return out


def declared(config_cls: type, name: str) -> bool:
    """Whether ``name`` of ``config_cls`` is declared with :func:`knob` (here or in a base)."""
    return _declaration(config_cls, name) is not None


_SPECS: dict[type, tuple[FieldSpec, ...]] = {}


def _specs(cls: type) -> tuple[FieldSpec, ...]:
    if cls not in _SPECS:           # config classes are immutable once defined: read them once
        _SPECS[cls] = tuple(fields_of(cls))
    return _SPECS[cls]


# ----------------------------------------------------------------------------- validation
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _matches(v: Any, tp: Any) -> bool:
    """Whether ``v`` is a value of annotation ``tp`` (an int is a float; a bool is not a number)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in typing.get_args(tp))
    if origin is Literal:
        return v in typing.get_args(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(v, tuple) and all(_matches(x, args[0] if args else Any) for x in v)
    if tp is type(None):
        return v is None
    if tp is float:
        return _is_number(v)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp) if isinstance(tp, type) else True


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin is tuple:
        return f"a list of {_type_text((typing.get_args(tp) or (Any,))[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_fields(config: Any) -> None:
    """Check every field of a config instance against its declaration; raise a one-line
    :class:`ConfigError` ``"<Class>.<field>: expected <range>, found <value>"``."""
    cls = type(config).__name__
    for spec in _specs(type(config)):
        v = getattr(config, spec.name)
        if not _matches(v, spec.type):
            expected = spec.describe() if spec.choices is not None else _type_text(spec.type)
            raise ConfigError(f"{cls}.{spec.name}: expected {expected}, found {v!r}")
        if spec.low is None and spec.high is None:
            continue
        for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
            if _is_number(x) and not spec.contains(x):
                where = f"{spec.name}[{i}]" if isinstance(v, tuple) else spec.name
                raise ConfigError(f"{cls}.{where}: expected {spec.describe()}, found {x!r}")


class Checked:
    """Mixin for a frozen config dataclass: fields checked against their declarations at
    construction, then :meth:`validate` (cross-field checks of one method)."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks across fields; raise :class:`ConfigError`."""


# ----------------------------------------------------------------------------- coercion
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """A plain value (a CLI string, a YAML scalar or list) as annotation ``tp`` wants it.

    Strings parse (``"8"`` -> 8, ``"a,b"`` -> a tuple, ``"none"`` -> None where None is
    allowed); YAML values are checked. Ranges are not checked here: the config's
    construction does that, once. Raises a one-line :class:`ConfigError` naming ``where``.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        for c in typing.get_args(tp):
            if value == c or isinstance(value, str) and not isinstance(c, str) and value == str(c):
                return c
        raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, found {value!r}")
    if origin is tuple:
        return _coerce_tuple(value, tp, where)
    if tp in (bool, int, float, str):
        return _coerce_scalar(value, tp, where)
    return value


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    text = value.strip() if isinstance(value, str) else None
    if tp is bool and isinstance(value, bool) or tp is str and text is not None:
        return value
    if tp is bool and text is not None and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and _is_number(value):
        return float(value)
    if tp in (int, float) and text:
        try:
            return tp(text)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {_type_text(tp)}, found {value!r}")


def _coerce_tuple(value: Any, tp: Any, where: str) -> tuple:
    item = (typing.get_args(tp) or (Any,))[0]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected {_type_text(tp)}, found {value!r}")
    return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    arms = typing.get_args(tp)
    if type(None) in arms and (value is None or isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    # scalars before tuples: "0.5" is a number, "0.5,0.3" a per-model tuple
    ordered = sorted((a for a in arms if a is not type(None)), key=lambda a: typing.get_origin(a) is tuple)
    for a in ordered:
        try:
            return coerce(value, a, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: expected {_type_text(tp)}, found {value!r}")


def coerce_fields(config_cls: type, values: Mapping[str, Any], where: str, owner: str | None = None
                  ) -> dict[str, Any]:
    """Coerce ``{field: plain value}`` for ``config_cls``; an unknown field is a one-line error
    ``"<where>.<key>: expected a field of <owner> ([...]), found '<key>'"`` (owner: the class name)."""
    hints = {s.name: s.type for s in _specs(config_cls)}
    out = {}
    for k, v in values.items():
        if k not in hints:
            raise ConfigError(f"{where}.{k}: expected a field of {owner or config_cls.__name__} ({sorted(hints)}), "
                              f"found {k!r}")
        out[k] = coerce(v, hints[k], f"{where}.{k}")
    return out
