"""Search spaces read from the configs' own field declarations (no per-method tables).

Every PEFT and merge config declares its fields once (:func:`deltakit.core.fields.knob`:
type, bounds, ``log``, choices). A :class:`MethodSpace` turns one config class into Optuna
distributions by one generic rule:

* a numeric field declared ``log=True`` (a size: LoRA's ``r``, a bottleneck width, a
  density) is **searched by default**, on a log scale over ``[default / 8, default * 8]``
  clipped to its declared bounds (a declaration gives a lower bound; the factor 8 either
  side of the paper default is what a search needs besides, and is one rule for all);
* every other field stays at its default unless the YAML opens it.

The YAML restricts or extends any of it, per method or for every method declaring a field
(``fields:``)::

    methods:
      lora: {r: [2, 64], alpha: 16, init: [kaiming, gaussian], dropout: {low: 0, high: 0.2}}
      houlsby: {}                   # its declared default space
      unified: {layers: switch}     # per-layer on/off (AutoPEFT)
    drop: [full]                    # with methods: all
    fields: {dropout: search}       # every method with a 'dropout' field, at its declared range
    training: {lr: [1e-5, 1e-2], steps: 200, warmup: 0.1}

A field's value is fixed (a scalar, or a list for a list-typed field; ``default``: its
declared default), a range (``[low, high]`` or ``{low, high, log}``; a per-model merge field
takes only the mapping form), a choice (``{choices: [...]}``, or a list for a ``Literal`` /
bool field) or ``search`` (its declared / derived range). Errors are one line naming the
field, what was expected and what was found. :data:`DEFAULTS` (the same YAML) comes first:
numerical tolerances (``eps``) are declared on a log scale but are not knobs.

The cross-method space is Optuna define-by-run: ``method`` is a categorical and only the
chosen method's knobs are suggested (named ``<method>.<field>``), so they are conditional on it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..core.fields import ConfigError, FieldSpec, coerce, knob
from ..core.registry import DeltaConfig
from ..core.fields import fields_of

__all__ = ["SpaceError", "Param", "MethodSpace", "Space", "TrainingConfig", "method_space", "build_space",
           "derived_range", "LAYER_SWITCH", "SPAN", "DEFAULTS"]

#: the default search range of a log-declared field: [default / SPAN, default * SPAN]
SPAN = 8
#: entries every space starts from, in the user's YAML language (overridden by the user's)
DEFAULTS = {"fields": {"eps": "default"}}
#: the YAML value of ``layers`` that searches one on/off switch per block (AutoPEFT)
LAYER_SWITCH = "switch"
_WHERE_FIELDS = {f.name for f in dataclasses.fields(DeltaConfig)}  # where to attach, not what to train


class SpaceError(ConfigError):
    """A search-space entry is unknown, of the wrong kind or outside what its field accepts."""


@dataclass(frozen=True)
class TrainingConfig:
    """The training knobs a search may vary, declared like a method config's fields.
    ``warmup`` is a fraction of ``steps`` (``deltakit train`` uses 0.1)."""

    lr: float = knob(5e-4, gt=0, log=True, doc="peak learning rate")
    steps: int = knob(200, ge=1, doc="optimiser steps (the fidelity axis of multi-fidelity search)")
    warmup: float = knob(0.1, ge=0, le=0.5, doc="linear warm-up, as a fraction of the steps")


@dataclass(frozen=True)
class Param:
    """One searched or fixed knob. ``kind``: ``int`` / ``float`` (``low``..``high``, ``log``),
    ``categorical`` (``choices``) or ``fixed`` (``value``)."""

    name: str
    kind: Literal["int", "float", "categorical", "fixed"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    value: Any = None

    def suggest(self, trial: Any, prefix: str) -> Any:
        key = f"{prefix}{self.name}"
        if self.kind == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(key, self.low, self.high, log=self.log)
        if self.kind == "categorical":
            # Optuna stores categorical choices as JSON scalars: tuples go in as lists' text
            picked = trial.suggest_categorical(key, [_jsonable(c) for c in self.choices])
            return self.choices[[_jsonable(c) for c in self.choices].index(picked)]
        return self.value

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"= {self.value!r}"
        if self.kind == "categorical":
            return f"in {list(self.choices)}"
        return f"in [{_num(self.low)}, {_num(self.high)}]{' log' if self.log else ''}"


def _jsonable(c: Any) -> Any:
    return c if c is None or isinstance(c, (bool, int, float, str)) else repr(c)


def _num(x: float | None) -> str:
    return "None" if x is None else (str(int(x)) if float(x).is_integer() else f"{x:.4g}")


# ----------------------------------------------------------------------------- one field
def derived_range(spec: FieldSpec) -> tuple[float, float] | None:
    """The default search range of a numeric field: its declared bounds when it has both,
    else ``[default / SPAN, default * SPAN]`` for a log-declared one (clipped to the bounds),
    else None (a range must come from the YAML). Open bounds move inwards by one unit for an
    integer and by 1e-6 of the width for a float."""
    is_int = spec.item_type is int
    if spec.low is not None and spec.high is not None and not spec.log:
        lo, hi = float(spec.low), float(spec.high)
    elif spec.log and isinstance(spec.default, (int, float)) and spec.default > 0:
        lo, hi = spec.default / SPAN, spec.default * SPAN
        lo = max(lo, spec.low) if spec.low is not None else lo
        hi = min(hi, spec.high) if spec.high is not None else hi
    else:
        return None
    if is_int:
        lo, hi = math.ceil(lo) + (1 if spec.low_open and lo == spec.low else 0), math.floor(hi)
        hi -= 1 if spec.high_open and hi == spec.high else 0
    else:
        eps = 1e-6 * (hi - lo)
        lo, hi = lo + (eps if spec.low_open and lo == spec.low else 0), hi - (eps if spec.high_open and hi == spec.high else 0)
    return lo, hi


def _choices_of(spec: FieldSpec) -> tuple | None:
    if spec.choices is not None:
        return tuple(spec.choices)
    return (False, True) if spec.type is bool else None


def default_param(spec: FieldSpec) -> Param:
    """The field by the generic rule: log-declared numbers searched, everything else fixed."""
    if spec.log and spec.item_type in (int, float) and not spec.per_model:
        rng = derived_range(spec)
        if rng is not None and rng[0] < rng[1]:
            return Param(spec.name, "int" if spec.item_type is int else "float", *rng, log=True)
    return Param(spec.name, "fixed", value=spec.default)


def field_param(spec: FieldSpec, value: Any, where: str) -> Param:
    """The YAML entry ``value`` for field ``spec``: fixed, a range, choices, ``search`` or
    ``default`` (fixed at the declared default)."""
    if value == "default":
        return Param(spec.name, "fixed", value=spec.default)
    if value == "search":
        return _opened(spec, where)
    if isinstance(value, Mapping):
        return _from_mapping(spec, value, where)
    choices = _choices_of(spec)
    if isinstance(value, list) and choices is not None:
        return _categorical(spec, value, where)
    if isinstance(value, list) and spec.item_type in (int, float) and not _is_listy(spec.type):
        if len(value) != 2:
            raise SpaceError(f"{where}: expected [low, high], found {value!r}")
        return _range(spec, value[0], value[1], spec.log, where)
    return Param(spec.name, "fixed", value=_checked(spec, value, where))


def _is_listy(tp: Any) -> bool:
    import typing
    return any(typing.get_origin(a) is tuple for a in (typing.get_args(tp) or (tp,)))


def _opened(spec: FieldSpec, where: str) -> Param:
    choices = _choices_of(spec)
    if choices is not None:
        return Param(spec.name, "categorical", choices=choices)
    rng = derived_range(spec) if spec.item_type in (int, float) else None
    if rng is None:
        raise SpaceError(f"{where}: expected [low, high] or {{choices: [...]}} (the declaration gives no range), "
                         f"found 'search'")
    return Param(spec.name, "int" if spec.item_type is int else "float", *rng,
                 log=spec.log and rng[0] > 0)


def _from_mapping(spec: FieldSpec, value: Mapping, where: str) -> Param:
    if set(value) == {"choices"}:
        if not isinstance(value["choices"], list) or not value["choices"]:
            raise SpaceError(f"{where}.choices: expected a non-empty list, found {value['choices']!r}")
        return _categorical(spec, value["choices"], f"{where}.choices")
    unknown = sorted(set(value) - {"low", "high", "log"})
    if unknown or not {"low", "high"} <= set(value):
        raise SpaceError(f"{where}: expected {{low, high[, log]}} or {{choices: [...]}}, found {dict(value)}")
    return _range(spec, value["low"], value["high"], bool(value.get("log", spec.log)), where)


def _range(spec: FieldSpec, low: Any, high: Any, log: bool, where: str) -> Param:
    if spec.item_type not in (int, float):
        raise SpaceError(f"{where}: expected {spec.describe()} (not a number range), found [{low!r}, {high!r}]")
    lo, hi = (_checked(spec, v, f"{where}.{k}", item=True) for k, v in (("low", low), ("high", high)))
    if lo > hi:
        raise SpaceError(f"{where}: expected low <= high, found [{lo!r}, {hi!r}]")
    if log and lo <= 0:
        raise SpaceError(f"{where}: expected low > 0 on a log scale, found {lo!r}")
    if lo == hi:
        return Param(spec.name, "fixed", value=lo)
    return Param(spec.name, "int" if spec.item_type is int else "float", lo, hi, log=log)


def _categorical(spec: FieldSpec, values: list, where: str) -> Param:
    checked = tuple(_checked(spec, v, f"{where}[{i}]") for i, v in enumerate(values))
    return Param(spec.name, "categorical", choices=tuple(dict.fromkeys(checked)))


def _checked(spec: FieldSpec, value: Any, where: str, item: bool = False) -> Any:
    """``value`` coerced to the field's type and inside its declared bounds (one-line error)."""
    try:
        v = coerce(value, spec.item_type if item else spec.type, where)
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    for x in v if isinstance(v, tuple) else (v,):
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not spec.contains(x):
            raise SpaceError(f"{where}: expected {spec.describe()}, found {x!r}")
    return v


# ----------------------------------------------------------------------------- one method
@dataclass(frozen=True)
class MethodSpace:
    """The knobs of one method: ``params`` (searched or fixed config fields) and, with
    ``num_layers``, one on/off switch per block (``layers``), AutoPEFT's layer selection."""

    method: str
    config: type
    params: tuple[Param, ...]
    num_layers: int | None = None

    def sample(self, trial: Any) -> dict[str, Any]:
        """Config keyword arguments for one trial (only searched knobs become trial params)."""
        prefix = f"{self.method}."
        out = {p.name: p.suggest(trial, prefix) for p in self.params if not _is_default(p, self.config)}
        if self.num_layers is not None:
            on = [i for i in range(self.num_layers)
                  if trial.suggest_categorical(f"{prefix}layer{i}", [True, False])]
            out["layers"] = tuple(on)
        return out

    def searched(self) -> list[Param]:
        return [p for p in self.params if p.kind != "fixed"]


def _is_default(p: Param, config: type) -> bool:
    """A fixed knob equal to the declared default is left out of the config (shorter commands)."""
    return p.kind == "fixed" and any(f.name == p.name and f.default == p.value for f in fields_of(config))


def method_space(name: str, config: type, overrides: Mapping[str, Any] | None = None, *,
                 shared: Mapping[str, Any] | None = None, num_layers: int | None = None,
                 where: str = "methods") -> MethodSpace:
    """The space of one config class: the generic rule, then ``shared`` (entries for every
    method declaring the field), then the method's own ``overrides``."""
    overrides = dict(overrides or {})
    specs = {s.name: s for s in fields_of(config)}
    for k in overrides:
        if k not in specs:
            raise SpaceError(f"{where}.{name}.{k}: expected a field of {name} ({sorted(set(specs) - _WHERE_FIELDS)})"
                             f", found {k!r}")
    switch = overrides.get("layers") == LAYER_SWITCH
    if switch:
        del overrides["layers"]
        if not num_layers:
            raise SpaceError(f"{where}.{name}.layers: expected the model's number of layers for 'switch', found none")
    params = []
    for s in specs.values():
        if s.name in overrides:
            params.append(field_param(s, overrides[s.name], f"{where}.{name}.{s.name}"))
        elif shared and s.name in shared and s.name not in _WHERE_FIELDS:
            params.append(field_param(s, shared[s.name], f"fields.{s.name} ({name})"))
        elif s.name not in _WHERE_FIELDS:
            params.append(default_param(s))
    return MethodSpace(name, config, tuple(params), num_layers if switch else None)


# ----------------------------------------------------------------------------- the whole space
@dataclass(frozen=True)
class Space:
    """A cross-method space plus the training knobs. ``sample(trial)`` -> (method, config
    kwargs, training kwargs); with one method the ``method`` categorical has one choice."""

    methods: dict[str, MethodSpace]
    training: MethodSpace

    def sample(self, trial: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
        method = trial.suggest_categorical("method", list(self.methods))
        settings = self.methods[method].sample(trial)
        return method, settings, self.training_values(trial)

    def training_values(self, trial: Any) -> dict[str, Any]:
        return {p.name: p.suggest(trial, "train.") for p in self.training.params}

    def describe(self) -> list[dict[str, str]]:
        """One row per searched knob (for ``--help``-style listings and the report)."""
        rows = [{"knob": "method", "range": f"in {list(self.methods)}"}]
        for m in self.methods.values():
            rows += [{"knob": f"{m.method}.{p.name}", "range": p.describe()} for p in m.searched()]
            if m.num_layers:
                rows.append({"knob": f"{m.method}.layer0..{m.num_layers - 1}", "range": "on / off"})
        rows += [{"knob": f"train.{p.name}", "range": p.describe()} for p in self.training.params]
        return rows


def _method_entries(doc: Mapping[str, Any], registry: Mapping[str, Any], where: str) -> dict[str, Mapping]:
    """``methods:`` as {name: overrides}: a mapping, a list of names, or ``all`` (minus ``drop``)."""
    raw = doc.get("methods", "all")
    if raw == "all":
        entries = {n: {} for n in registry}
    elif isinstance(raw, list):
        entries = {n: {} for n in raw}
    elif isinstance(raw, Mapping):
        entries = {n: (v or {}) for n, v in raw.items()}
    else:
        raise SpaceError(f"{where}.methods: expected 'all', a list of names or a mapping, found {raw!r}")
    drop = doc.get("drop", [])
    if not isinstance(drop, list):
        raise SpaceError(f"{where}.drop: expected a list of method names, found {drop!r}")
    for n in [*entries, *drop]:
        if n not in registry:
            raise SpaceError(f"{where}.methods.{n}: expected one of {sorted(registry)}, found {n!r}")
    for n, v in entries.items():
        if not isinstance(v, Mapping):
            raise SpaceError(f"{where}.methods.{n}: expected a mapping of field: value, found {v!r}")
    out = {n: v for n, v in entries.items() if n not in drop}
    if not out:
        raise SpaceError(f"{where}.methods: expected at least one method left after drop, found none")
    return out


def build_space(doc: Mapping[str, Any], *, num_layers: int | None = None, where: str = "space") -> Space:
    """A PEFT :class:`Space` from the YAML mapping ``doc`` (keys ``methods``, ``drop``,
    ``fields``, ``training``; others are the study's, see :mod:`deltakit.search.spec`)."""
    from ..core.registry import methods as registered

    specs = registered()
    shared = {**DEFAULTS["fields"], **_mapping(doc.get("fields"), f"{where}.fields")}
    entries = _method_entries(doc, {n: s.config for n, s in specs.items()}, where)
    spaces = {n: method_space(n, specs[n].config, ov, shared=shared, num_layers=num_layers, where=f"{where}.methods")
              for n, ov in entries.items()}
    training = method_space("training", TrainingConfig, _mapping(doc.get("training"), f"{where}.training"),
                            where=where)
    return Space(spaces, dataclasses.replace(training, method="train"))


def _mapping(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise SpaceError(f"{where}: expected a mapping, found {v!r}")
    return dict(v)


def config_from(method: str, settings: Mapping[str, Any]) -> DeltaConfig:
    """The method's config for one sampled point (its construction checks every field)."""
    from ..core.registry import get_method

    return get_method(method).config(**settings)
