"""Method registry and the base of every method config.

Methods register where they are defined::

    @register_method("lora", LoraConfig, paper="https://arxiv.org/abs/2106.09685",
                     description="low-rank update B @ A")
    class LoRA(WeightDelta): ...

A duplicate name is an error; there is no central table to edit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .fields import ConfigError, check_fields, knob

__all__ = ["DeltaConfig", "MethodSpec", "register_method", "get_method", "methods", "ConfigError"]


@dataclass(frozen=True)
class DeltaConfig:
    """Fields every method shares: where to attach.

    Every field of every method config is declared with :func:`~deltakit.core.fields.knob`
    (type, range or choices, doc), checked at construction; ``fields_of(cls)`` lists them.
    """

    method: ClassVar[str] = ""

    targets: tuple[str, ...] | None = knob(
        None, doc="module paths / suffixes / 're:' regexes to attach to; None = the family default")
    target_types: tuple[str, ...] | None = knob(None, doc="module classes or class names the targets must be")
    layers: tuple[int, ...] | None = knob(None, ge=0, doc="only targets whose block index is in this set")
    exclude: tuple[str, ...] = knob((), doc="patterns removed from the match")
    modules_to_save: tuple[str, ...] = knob(
        (), doc="modules trained in full and stored whole (e.g. a new classification head), as peft's")
    adapter_dtype: str = knob("auto", doc="dtype of the delta parameters (a torch dtype name); 'auto' keeps "
                                          "fp32 under a half-precision base")

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
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks across fields; raise :class:`ConfigError`."""

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
