"""Registry of merge methods: ``@register_merge(name, paper=..., config=...)``.

A merge method is a pure function ``fn(x, base, cfg, ctx) -> Tensor``:

- ``x`` (K, *shape): the K inputs for one parameter - task vectors ``theta_k - theta_0``
  when the method is registered with ``inputs="deltas"`` (the default), or the K
  fine-tuned weights themselves with ``inputs="weights"``;
- ``base`` (*shape): the base weight ``theta_0`` (zeros when there is no base model);
- ``cfg``: the method's frozen dataclass config;
- ``ctx``: :class:`MergeContext` (parameter name, layer index, statistics, RNG).

It returns the merged *weight* (*shape), computed in the dtype of ``x`` (the
executor passes fp32 or fp64), and never mutates its inputs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..core.fields import ConfigError, coerce_fields

__all__ = ["register_merge", "get_merge", "list_merges", "MergeMethod", "MergeContext", "build_config",
           "MergeConfigError"]


# which library function makes each statistic (named in the error when a run has none)
_STAT_SOURCE = {"gram": "collect_grams", "fisher": "estimate_fisher", "graft_mask": "localize_skill"}


class MergeConfigError(ConfigError):
    """A merge configuration value is missing or of the wrong kind."""


@dataclass
class MergeContext:
    """What a pure merge function may know besides the tensors.

    ``stats`` maps statistic names to tensors stacked over the K models, e.g.
    ``"fisher"`` (K, *shape) or ``"gram"`` (K, in, in); ``layer`` is the block index
    parsed from the name (None for embeddings / head), ``num_layers`` the model's depth.
    """

    name: str = ""
    layer: int | None = None
    num_layers: int | None = None
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    config: type
    paper: str
    inputs: Literal["deltas", "weights"]
    needs_stats: tuple[str, ...] = ()
    uses_stats: tuple[str, ...] = ()
    # (cfg, K) -> [c_1..c_K] when, for that config, fn(x, base) == b + sum_k c_k x_k with
    # b = base for "deltas" inputs and 0 for "weights" (None: not a linear combination).
    # The executor then sums straight from the files, without stacking the K inputs.
    linear_form: Callable[[Any, int], list[float] | None] | None = None

    def require_stats(self, stats_for: Callable[[str], Mapping] | None, names: Iterable[str]) -> None:
        """Before a merge run: a method that reads statistics where present (RegMean's Grams
        exist only for linear layers) still needs them for some tensor; without any it would
        silently become another method (the plain mean)."""
        if not (self.needs_stats or self.uses_stats):
            return
        if stats_for is None or not any(stats_for(n) for n in names):
            kind = (self.needs_stats or self.uses_stats)[0]
            raise MergeConfigError(f"{self.name}: expected {kind!r} statistics from data "
                                   f"(deltakit.merge.{_STAT_SOURCE.get(kind, 'estimate_fisher')}), found none")

    def __call__(self, x: torch.Tensor | list[torch.Tensor], base: torch.Tensor, cfg: Any = None,
                 ctx: MergeContext | None = None) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            x = torch.stack(list(x))
        cfg = self.config() if cfg is None else cfg
        if not isinstance(cfg, self.config):
            raise MergeConfigError(f"{self.name}: expected a {self.config.__name__}, found {type(cfg).__name__}")
        if x.dim() != base.dim() + 1 or tuple(x.shape[1:]) != tuple(base.shape):
            raise ValueError(f"{self.name}: expected inputs (K, {', '.join(map(str, base.shape))}), "
                             f"found {tuple(x.shape)}")
        ctx = ctx or MergeContext()
        missing = [s for s in self.needs_stats if s not in ctx.stats]
        if missing:
            raise MergeConfigError(f"{self.name}: expected statistic {missing[0]!r} in ctx.stats, "
                                   f"found {sorted(ctx.stats)}")
        return self.fn(x, base, cfg, ctx)


_REGISTRY: dict[str, MergeMethod] = {}


def register_merge(name: str, *, paper: str, config: type, inputs: Literal["deltas", "weights"] = "deltas",
                   needs_stats: tuple[str, ...] = (), uses_stats: tuple[str, ...] = (),
                   linear_form: Callable[[Any, int], list[float] | None] | None = None) -> Callable:
    """Register a pure merge function under ``name``; a duplicate name is an error.

    ``needs_stats``: statistics every tensor must have; ``uses_stats``: statistics read
    where present, of which a merge run must supply at least some. ``linear_form``: see
    :class:`MergeMethod` (a fast path; the function stays the reference)."""
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{name}: expected a frozen dataclass config, found {config!r}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered (by {_REGISTRY[name].fn.__module__})")
        _REGISTRY[name] = MergeMethod(name, fn, config, paper, inputs, tuple(needs_stats), tuple(uses_stats),
                                      linear_form)
        return fn

    return deco


def get_merge(name: str) -> MergeMethod:
    from . import methods  # noqa: F401  (registers the built-in methods)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeConfigError(f"expected a merge method in {sorted(_REGISTRY)}, found {name!r}") from None


def list_merges() -> dict[str, MergeMethod]:
    from . import methods  # noqa: F401
    return dict(sorted(_REGISTRY.items()))


def build_config(method: MergeMethod | str, values: Mapping[str, Any], where: str = "parameters") -> Any:
    """Build ``method``'s config from plain values (YAML, CLI strings) through the one coercion
    of :mod:`deltakit.core.fields`; unknown, ill-typed or out-of-range fields are one-line errors."""
    m = get_merge(method) if isinstance(method, str) else method
    try:
        kwargs = coerce_fields(m.config, values, where, owner=m.name)
    except ConfigError as e:
        raise MergeConfigError(str(e)) from None
    try:
        return m.config(**kwargs)
    except (ValueError, TypeError) as e:
        raise MergeConfigError(f"{where}: {e}") from None
