"""Method registry and the base of every method config.

Methods register where they are defined::

    @register_method("lora", LoraConfig, paper="https://arxiv.org/abs/2106.09685",
                     description="low-rank update B @ A")
    class LoRA(WeightDelta): ...

A duplicate name is an error; there is no central table to edit.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["DeltaConfig", "MethodSpec", "register_method", "get_method", "methods", "ConfigError"]


class ConfigError(ValueError):
    """A config field has a value outside what the method accepts."""


@dataclass(frozen=True)
class DeltaConfig:
    """Fields every method shares: where to attach.

    Attributes:
        targets: module paths / suffixes / ``re:`` regexes; None = the family default.
        target_types: module classes or class names the targets must be.
        layers: only targets whose block index is in this set.
        exclude: patterns removed from the match.
        modules_to_save: modules trained in full and stored whole (e.g. a new
            classification head), as in peft's ``modules_to_save``.
        adapter_dtype: dtype of the delta parameters; ``"auto"`` keeps fp32 under a
            half-precision base.
    """

    method: ClassVar[str] = ""

    targets: tuple[str, ...] | None = None
    target_types: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    exclude: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    adapter_dtype: str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
            elif isinstance(v, str) and f.name in ("targets", "exclude", "modules_to_save"):
                object.__setattr__(self, f.name, (v,))
        if self.target_types is not None:
            object.__setattr__(self, "target_types", tuple(
                t if isinstance(t, str) else t.__name__ for t in self.target_types))
        self._check_literals()
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise :class:`ConfigError`."""

    def _check_literals(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            hint = hints.get(f.name)
            if typing.get_origin(hint) is typing.Literal:
                allowed = typing.get_args(hint)
                if getattr(self, f.name) not in allowed:
                    raise ConfigError(
                        f"{type(self).__name__}.{f.name}: expected one of {list(allowed)}, "
                        f"found {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeltaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "DeltaConfig":
        return dataclasses.replace(self, **changes)


def positive(config: DeltaConfig, *names: str) -> None:
    for n in names:
        v = getattr(config, n)
        if v is None or v <= 0:
            raise ConfigError(f"{type(config).__name__}.{n}: expected a positive number, found {v!r}")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type
    config: type[DeltaConfig]
    kind: str
    paper: str
    description: str
    conv: bool = field(default=False)


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config: type[DeltaConfig], *, paper: str, description: str) -> Callable[[type], type]:
    """Register a delta class as method ``name`` with its config class."""

    def deco(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].cls.__qualname__}")
        if config.method and config.method != name:
            raise ValueError(f"{config.__name__} already belongs to method {config.method!r}")
        config.method = name
        import torch.nn as nn

        conv = any(issubclass(t, nn.Conv2d) for t in getattr(cls, "supported", ()))
        _METHODS[name] = MethodSpec(name, cls, config, cls.kind, paper, description, conv)
        cls.method_name = name
        return cls

    return deco


def methods() -> dict[str, MethodSpec]:
    """All registered methods, by name (``import deltakit`` registers the built-in ones)."""
    return dict(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {sorted(_METHODS)}")
    return _METHODS[name]
