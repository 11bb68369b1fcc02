"""What every router shares: the registry, the routing scope, and a record of its choices.

A router holds K adapter names (attached to the model under those names) and, per batch,
produces routing weights that :func:`deltakit.core.adapter.routed` applies. It records what
it chose, so that ``deltakit route`` can show which adapters each row (or token) used.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import routed

__all__ = ["Router", "Decision", "RoutingError", "register_router", "get_router", "list_routers"]

_ROUTERS: dict[str, type["Router"]] = {}


class RoutingError(ValueError):
    """A router cannot route as asked (bad input, no adapter the caller may use, ...)."""


@dataclass
class Decision:
    """What a router chose for one input row: ``weights`` maps adapter name -> mean weight
    (over tokens and layers where it routes per token), largest first; ``tokens`` optionally
    holds, per token, the top adapter name."""

    weights: dict[str, float]
    tokens: list[str] | None = None

    @property
    def top(self) -> str | None:
        return next(iter(self.weights), None)


def register_router(name: str) -> Callable[[type["Router"]], type["Router"]]:
    def deco(cls: type[Router]) -> type[Router]:
        if name in _ROUTERS:
            raise ValueError(f"router {name!r} is registered twice ({_ROUTERS[name].__name__}, {cls.__name__})")
        cls.router_name = name
        _ROUTERS[name] = cls
        return cls
    return deco


def get_router(name: str) -> type["Router"]:
    try:
        return _ROUTERS[name]
    except KeyError:
        raise RoutingError(f"unknown router {name!r}; expected one of {sorted(_ROUTERS)}") from None


def list_routers() -> list[str]:
    return sorted(_ROUTERS)


@dataclass
class Router:
    """Base class. Subclasses implement :meth:`weights_for` (fixed per-row weights for a batch,
    or a callable ``fn(layer, x)`` for per-layer routing) and may override :meth:`scope`.

    ``names``: the K adapters routed over, attached to the model under these names.
    """

    names: tuple[str, ...]
    decisions: list[Decision] = field(default_factory=list, init=False, repr=False)
    router_name: ClassVar[str] = ""

    def weights_for(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor | Callable:
        raise NotImplementedError

    @contextlib.contextmanager
    def scope(self, model: nn.Module, batch: Mapping[str, Any]) -> Iterator[None]:
        """Within the block, ``model``'s forwards on ``batch`` are routed by this router."""
        w = self.weights_for(model, batch)
        if isinstance(w, Tensor):
            self.record(w)
        with routed(model, self.names, w):
            yield

    def record(self, w: Tensor) -> None:
        """Keep one :class:`Decision` per row of fixed weights ``(B, K)`` or ``(B, T, K)``."""
        w = w.detach().float()
        if w.dim() == 3:
            w = w.mean(1)
        self.decisions = [_decision(self.names, row) for row in w]


def _decision(names: Sequence[str], row: Tensor) -> Decision:
    order = torch.argsort(row, descending=True).tolist()
    return Decision({names[i]: round(float(row[i]), 4) for i in order if float(row[i]) != 0.0})
