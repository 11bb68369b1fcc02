"""Merge-recipe spaces: the merge method, its knobs (density, lambda, ...) and per-layer
coefficients, each sample a recipe ``deltakit merge`` (:func:`deltakit.merge.recipe.load_recipe`)
reads as it is.

The knobs come from the merge configs' declarations through the same rule and YAML as the
PEFT spaces (:mod:`deltakit.search.space`); the shipped default (:data:`MERGE_DEFAULTS`,
written in that YAML) opens ``density`` and ``t`` at their declared ranges and ``lam`` over
[0.25, 2]. ``layer_weights: [low, high]`` adds one coefficient per (model, layer): the recipe
gets ``weight: [c_0, ..., c_{L-1}]`` per model, a list the recipe reads as a gradient over
depth, which at block ``i`` of ``L`` is exactly ``c_i`` (non-block tensors take ``c_0``).

Methods that need statistics from data (Fisher, RegMean) are left out of ``methods: all``:
a sampled recipe could not run without them.

The CMA-ES search of merging coefficients itself stays in :mod:`deltakit.merge._evolve`
(``evolve_coefficients``, re-exported here): ``route/lorahub.py`` shares its ask / tell loop,
and ``merge`` may not import ``search`` (tests/test_layering.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from ..merge._evolve import EvolveResult, evolve_coefficients
from .space import DEFAULTS, MethodSpace, SpaceError, _mapping, _method_entries, method_space

__all__ = ["MergeSpace", "merge_space", "MERGE_DEFAULTS", "evolve_coefficients", "EvolveResult"]

MERGE_DEFAULTS = """
methods: all
fields:
  density: search
  t: search
  lam: {low: 0.25, high: 2.0}
"""


@dataclass(frozen=True)
class MergeSpace:
    """A cross-method merge space over ``models`` (paths); ``sample(trial)`` -> a recipe dict."""

    methods: dict[str, MethodSpace]
    models: tuple[str, ...]
    layer_weights: tuple[float, float] | None = None
    num_layers: int | None = None

    def sample(self, trial: Any) -> dict[str, Any]:
        from ..merge._registry import get_merge
        from ..merge.recipe import per_model_fields

        method = trial.suggest_categorical("merge.method", list(self.methods))
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.methods[method].sample(trial).items()}
        models: list[Any] = list(self.models)
        if self.layer_weights and "weights" in per_model_fields(get_merge(method).config):
            lo, hi = self.layer_weights
            models = [{"model": m, "weight": [trial.suggest_float(f"weight.{k}.layer{i}", lo, hi)
                                              for i in range(self.num_layers)]}
                      for k, m in enumerate(self.models)]
        return {"method": method, "models": models, "parameters": params}


def merge_space(doc: Mapping[str, Any] | None, models: Sequence[str], *, num_layers: int | None = None,
                where: str = "merge") -> MergeSpace:
    """A merge space from YAML ``doc`` (``methods``, ``drop``, ``fields``, ``layer_weights``),
    on top of :data:`MERGE_DEFAULTS` (a method or field given in ``doc`` replaces the default's)."""
    from ..merge._registry import list_merges

    doc = dict(doc or {})
    unknown = sorted(set(doc) - {"methods", "drop", "fields", "layer_weights"})
    if unknown:
        raise SpaceError(f"{where}.{unknown[0]}: expected one of ['drop', 'fields', 'layer_weights', 'methods'], "
                         f"found {unknown[0]!r}")
    defaults = yaml.safe_load(MERGE_DEFAULTS)
    usable = {n: m.config for n, m in list_merges().items() if not (m.needs_stats or m.uses_stats)}
    entries = _method_entries({**defaults, **doc}, usable, where)
    shared = {**DEFAULTS["fields"], **defaults["fields"], **_mapping(doc.get("fields"), f"{where}.fields")}
    spaces = {n: method_space(n, usable[n], ov, shared=_declared_in(usable[n], shared), where=f"{where}.methods")
              for n, ov in entries.items()}
    lw = _layer_weights(doc.get("layer_weights"), num_layers, where)
    return MergeSpace(spaces, tuple(str(m) for m in models), lw, num_layers if lw else None)


def _declared_in(config: type, shared: Mapping[str, Any]) -> dict[str, Any]:
    from ..core.fields import fields_of

    names = {s.name for s in fields_of(config)}
    return {k: v for k, v in shared.items() if k in names}


def _layer_weights(v: Any, num_layers: int | None, where: str) -> tuple[float, float] | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[0] < v[1]):
        raise SpaceError(f"{where}.layer_weights: expected [low, high] with low < high, found {v!r}")
    if not num_layers:
        raise SpaceError(f"{where}.layer_weights: expected the models' number of layers, found none")
    return float(v[0]), float(v[1])
