"""Merge recipes: deltakit's YAML and mergekit's YAML (for the methods both have).

deltakit recipe::

    method: ties                    # any registered merge method
    base_model: ./base              # optional for weight-space methods (linear, ...)
    models:
      - model: ./math
        weight: 1.0                 # per-model fields become tuples: weights, density, ...
        density: 0.5
      - ./code                      # a bare path uses the shared / default values
    parameters:                     # the method's config fields (see list_merges())
      lam: 1.0
      t: [0.0, 0.5, 1.0]            # a list of numbers = gradient over layer depth
      gamma: [{filter: mlp, value: 0.02}, {value: 0.01}]   # first matching name filter wins
    dtype: bfloat16                 # output dtype (default: the base's)
    compute_dtype: float32
    seed: 0                         # for random sparsifiers (DARE, DELLA)
    lines: {alpha: 0.5, beta: 0.5}  # optional LiNeS depth scaling on top of any method
    stats: {fisher: [f0.safetensors, f1.safetensors]}   # per-model statistics (fisher, gram)
    missing: error                  # or "base": a missing tensor counts as unchanged
    shard_size: 2GB

A model or ``base_model`` may also be a deltakit adapter directory or ``minilm`` (the
bundled model): see :mod:`deltakit.merge._inputs`.

A mergekit recipe (has ``merge_method``) is read for linear, task_arithmetic, ties,
dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp,
model_stock and multislerp, with mergekit's defaults (e.g. DARE rescales by L1 norm).
Errors name the field: ``recipe.models[1].weight: expected a number, found str 'x'``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltakit.io.models import BUNDLED

from ..core.fields import ConfigError, coerce, fields_of
from ._inputs import materialise_inputs
from ._registry import MergeConfigError, MergeMethod, build_config, get_merge, list_merges
from .executor import DTYPES, MergePlan, merge_checkpoints

__all__ = ["Recipe", "load_recipe", "run_recipe", "RecipeError", "MERGEKIT_METHODS"]


class RecipeError(MergeConfigError):
    """A recipe field is missing, unknown or of the wrong kind."""


_TOP = {"method", "models", "base_model", "parameters", "dtype", "compute_dtype", "seed", "lines", "missing",
        "shard_size", "stats"}
_PER_MODEL_ALIASES = {"weight": "weights"}
_ALIAS_BACK = {v: k for k, v in _PER_MODEL_ALIASES.items()}


def per_model_fields(config_cls: type) -> list[str]:
    """The fields a recipe may give per model (declared ``per_model`` in the config)."""
    return [s.name for s in fields_of(config_cls) if s.per_model]


@dataclass
class Recipe:
    """A validated recipe. ``config_for(name, layer, num_layers)`` gives one tensor's config."""

    method: MergeMethod
    models: list[str]
    base_model: str | None = None
    shared: dict[str, Any] = field(default_factory=dict)        # field -> setting
    per_model: list[dict[str, Any]] = field(default_factory=list)  # [model] field -> setting
    out_dtype: Any = None
    compute_dtype: Any = None
    seed: int | None = None
    lines: tuple[float, float] | None = None
    missing: str = "error"
    shard_bytes: int = 2 << 30
    source: str = "deltakit"
    stats: dict[str, list[str]] = field(default_factory=dict)  # kind -> one safetensors file per model

    def config_for(self, name: str, layer: int | None = None, num_layers: int = 0):
        try:
            return self._config_for(name, layer, num_layers)
        except RecipeError:
            raise
        except ConfigError as e:
            raise RecipeError(str(e)) from None

    def _config_for(self, name: str, layer: int | None, num_layers: int):
        t = 0.0 if layer is None else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
        values: dict[str, Any] = {}
        for k, s in self.shared.items():
            v = _evaluate(s, name, t, f"recipe.parameters.{k}")
            if v is not None:
                values[k] = v
        specs = {s.name: s for s in fields_of(self.method.config)}
        per_keys = sorted({k for pm in self.per_model for k in pm})
        for k in per_keys:
            col = []
            for i, pm in enumerate(self.per_model):
                where = f"recipe.models[{i}].{_ALIAS_BACK.get(k, k)}"
                v = _evaluate(pm[k], name, t, where) if k in pm else None
                if v is not None:
                    v = coerce(v, specs[k].item_type, where)
                if v is None:
                    v = values.get(k)
                    if v is None:
                        d = specs[k].default
                        v = 1.0 if d is None or isinstance(d, tuple) else d
                col.append(v)
            values[k] = tuple(col)
        return build_config(self.method, values, where="recipe.parameters")

    def plan(self) -> MergePlan:
        return MergePlan(method=self.method, config_for=self.config_for, out_dtype=self.out_dtype,
                         compute_dtype=self.compute_dtype or DTYPES["float32"], seed=self.seed, lines=self.lines,
                         missing=self.missing, stats_for=self._stats_for())  # type: ignore[arg-type]

    def _stats_for(self):
        if not self.stats:
            return None
        from deltakit.taskvec import LazyCheckpoint

        opened = {kind: [LazyCheckpoint(f) for f in files] for kind, files in self.stats.items()}

        def stats_for(name: str) -> dict:
            import torch

            return {kind: torch.stack([c.get(name, torch.float32) for c in cks])
                    for kind, cks in opened.items() if all(name in c for c in cks)}
        return stats_for


def _evaluate(setting: Any, name: str, t: float, where: str) -> Any:
    """Scalar -> itself; list of numbers -> linear gradient at t in [0, 1];
    list of {filter, value} -> the first entry whose filter is a substring of name (or absent)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, Mapping) for e in setting):
            for i, cond in enumerate(setting):
                bad = set(cond) - {"filter", "value"}
                if bad or "value" not in cond:
                    raise RecipeError(f"{where}[{i}]: expected keys filter/value, found {sorted(cond)}")
                f = cond.get("filter")
                if f is None or f == "*" or f in name:
                    return _evaluate(cond["value"], name, t, f"{where}[{i}].value")
            return None
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = pos - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(not isinstance(e, Mapping) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        raise RecipeError(f"{where}: expected numbers or filter/value entries, found a mix")
    return setting


def _parse_size(v: Any, where: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(v).upper())
    if not m:
        raise RecipeError(f"{where}: expected a size like 2GB or 500MB, found {v!r}")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def _dtype(v: Any, where: str):
    if v is None:
        return None
    if v not in DTYPES:
        raise RecipeError(f"{where}: expected one of {sorted(DTYPES)}, found {v!r}")
    return DTYPES[v]


def _compute_dtype(v: Any):
    if v is None:
        return None
    if v not in ("float32", "fp32", "float64"):
        raise RecipeError(f"recipe.compute_dtype: expected float32 or float64 (accumulation), found {v!r}")
    return DTYPES[v]


def _path(p: Any, root: Path | None, where: str) -> str:
    if not isinstance(p, (str, os.PathLike)):
        raise RecipeError(f"{where}: expected a checkpoint path, found {type(p).__name__} {p!r}")
    q = Path(p).expanduser()
    if str(p) == BUNDLED and not (root is not None and (root / q).exists()):
        return BUNDLED  # the bundled model's name, resolved when the merge runs (see _inputs.py)
    if not q.is_absolute() and root is not None:
        q = root / q
    return str(q)


def _check_mapping(d: Any, where: str) -> Mapping:
    if not isinstance(d, Mapping):
        raise RecipeError(f"{where}: expected a mapping, found {type(d).__name__} {d!r}")
    return d


def _validate(recipe: Recipe) -> Recipe:
    fields = {s.name for s in fields_of(recipe.method.config)}
    per = per_model_fields(recipe.method.config)
    for k in recipe.shared:
        if k not in fields:
            raise RecipeError(f"recipe.parameters.{k}: expected a field of {recipe.method.name} "
                              f"({sorted(fields)}), found {k!r}")
    for i, pm in enumerate(recipe.per_model):
        for k in pm:
            if k not in per:
                raise RecipeError(f"recipe.models[{i}].{k}: expected a per-model field of "
                                  f"{recipe.method.name} ({per}), found {k!r}")
    # Build one config per distinct tensor kind now, so bad values fail before any I/O.
    for name, layer in (("model.embed_tokens.weight", None), ("model.layers.0.self_attn.q_proj.weight", 0),
                        ("model.layers.1.mlp.up_proj.weight", 1), ("lm_head.weight", None)):
        recipe.config_for(name, layer, 2)
    return recipe


def _read_deltakit(d: Mapping, root: Path | None) -> Recipe:
    unknown = sorted(set(d) - _TOP)
    if unknown:
        raise RecipeError(f"recipe.{unknown[0]}: expected one of {sorted(_TOP)}, found {unknown[0]!r}")
    if "method" not in d:
        raise RecipeError("recipe.method: expected a merge method name, found nothing")
    if not isinstance(d["method"], str):
        raise RecipeError(f"recipe.method: expected a string, found {d['method']!r}")
    try:
        method = get_merge(d["method"])
    except MergeConfigError:
        raise RecipeError(f"recipe.method: expected one of {sorted(list_merges())}, found {d['method']!r}") from None
    models_raw = d.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"recipe.models: expected a non-empty list of models, found {models_raw!r}")
    models, per_model = [], []
    for i, m in enumerate(models_raw):
        if isinstance(m, Mapping):
            if "model" not in m:
                raise RecipeError(f"recipe.models[{i}].model: expected a checkpoint path, found nothing")
            models.append(_path(m["model"], root, f"recipe.models[{i}].model"))
            per_model.append({_PER_MODEL_ALIASES.get(k, k): v for k, v in m.items() if k != "model"})
        else:
            models.append(_path(m, root, f"recipe.models[{i}]"))
            per_model.append({})
    lines = d.get("lines")
    if lines is not None:
        lines = _check_mapping(lines, "recipe.lines")
        if set(lines) != {"alpha", "beta"} or not all(isinstance(lines[k], (int, float)) for k in lines):
            raise RecipeError(f"recipe.lines: expected {{alpha: number, beta: number}}, found {dict(lines)}")
        lines = (float(lines["alpha"]), float(lines["beta"]))
    seed = d.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RecipeError(f"recipe.seed: expected an integer, found {seed!r}")
    missing = d.get("missing", "error")
    if missing not in ("error", "base"):
        raise RecipeError(f"recipe.missing: expected 'error' or 'base', found {missing!r}")
    shared = dict(_check_mapping(d.get("parameters") or {}, "recipe.parameters"))
    stats: dict[str, list[str]] = {}
    for kind, files in _check_mapping(d.get("stats") or {}, "recipe.stats").items():
        if not isinstance(files, list) or len(files) != len(models):
            raise RecipeError(f"recipe.stats.{kind}: expected a list of {len(models)} safetensors files "
                              f"(one per model), found {files!r}")
        stats[kind] = [_path(f, root, f"recipe.stats.{kind}[{i}]") for i, f in enumerate(files)]
    missing_stats = [s for s in (*method.needs_stats, *method.uses_stats) if s not in stats]
    if missing_stats:
        raise RecipeError(f"recipe.stats.{missing_stats[0]}: expected per-model statistic files for "
                          f"{method.name}, found nothing")
    r = Recipe(method=method, models=models, per_model=per_model, shared=shared,
               base_model=_path(d["base_model"], root, "recipe.base_model") if d.get("base_model") else None,
               out_dtype=_dtype(d.get("dtype"), "recipe.dtype"),
               compute_dtype=_compute_dtype(d.get("compute_dtype")),
               seed=seed, lines=lines, missing=missing, stats=stats,
               shard_bytes=_parse_size(d.get("shard_size", 2 << 30), "recipe.shard_size"))
    if method.name == "slerp" and r.base_model is None:
        raise RecipeError("recipe.base_model: expected a base model for slerp, found nothing")
    return _validate(r)


# --- mergekit ------------------------------------------------------------------------------
# method -> (our method, fixed config values, {mergekit param: our field})
_GTA_PARAMS = {"weight": "weights", "density": "density", "lambda": "lam", "normalize": "normalize",
               "gamma": "gamma", "epsilon": "epsilon", "rescale": "rescale", "int8_mask": None}
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, Any], dict[str, str | None]]] = {
    "linear": ("linear", {"normalize": True}, {"weight": "weights", "normalize": "normalize"}),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}, _GTA_PARAMS),
    # magnitude_sort: entries tied at the trim threshold are kept in argsort's order, as
    # mergekit keeps them, so a mergekit recipe gives mergekit's tensors exactly
    "ties": ("ties", {"density": 1.0, "normalize": True, "sparsify": "magnitude_sort"}, _GTA_PARAMS),
    "dare_ties": ("dare_ties", {"density": 1.0, "normalize": False, "rescale": "l1"}, _GTA_PARAMS),
    "dare_linear": ("dare_linear", {"density": 1.0, "normalize": False, "rescale": "l1"}, _GTA_PARAMS),
    "breadcrumbs": ("breadcrumbs", {"density": 1.0, "normalize": False}, _GTA_PARAMS),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 1.0, "normalize": False}, _GTA_PARAMS),
    "della": ("della", {"density": 1.0, "normalize": True, "rescale": "l1"}, _GTA_PARAMS),
    "della_linear": ("della_linear", {"density": 1.0, "normalize": False, "rescale": "l1"}, _GTA_PARAMS),
    "slerp": ("slerp", {}, {"t": "t"}),
    "model_stock": ("model_stock", {}, {"filter_wise": "filter_wise"}),
    "multislerp": ("multislerp", {}, {"weight": "weights", "normalize_weights": "normalize_weights",
                                      "eps": "eps"}),
}
_MK_TOP = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
           "tokenizer", "chat_template", "name"}


def _mk_value(key: str, value: Any) -> Any:
    """mergekit's boolean ``rescale`` becomes our rescale mode."""
    if key == "rescale":
        conv = lambda v: ("l1" if v else "none") if isinstance(v, bool) else v  # noqa: E731
        if isinstance(value, list):
            return [dict(c, value=conv(c["value"])) if isinstance(c, Mapping) else conv(c) for c in value]
        return conv(value)
    return value


def _mk_params(params: Any, mapping: dict[str, str | None], where: str) -> dict[str, Any]:
    out = {}
    for k, v in _check_mapping(params or {}, where).items():
        if k not in mapping:
            raise RecipeError(f"{where}.{k}: expected one of {sorted(mapping)}, found {k!r}")
        if mapping[k] is not None:
            out[mapping[k]] = _mk_value(k, v)
    return out


def _read_mergekit(d: Mapping, root: Path | None) -> Recipe:
    unknown = sorted(set(d) - _MK_TOP)
    if unknown:
        hint = " (slices/modules are not supported)" if unknown[0] in ("slices", "modules") else ""
        raise RecipeError(f"recipe.{unknown[0]}: expected one of {sorted(_MK_TOP)}{hint}, found {unknown[0]!r}")
    mk = d["merge_method"]
    if mk not in MERGEKIT_METHODS:
        raise RecipeError(f"recipe.merge_method: expected one of {sorted(MERGEKIT_METHODS)} "
                          f"(the mergekit methods deltakit reads), found {mk!r}")
    ours, fixed, mapping = MERGEKIT_METHODS[mk]
    method = get_merge(ours)
    base = _path(d["base_model"], root, "recipe.base_model") if d.get("base_model") else None
    models_raw = d.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"recipe.models: expected a non-empty list of models, found {models_raw!r}")
    models, per_model = [], []
    for i, m in enumerate(models_raw):
        m = _check_mapping(m, f"recipe.models[{i}]")
        if "model" not in m:
            raise RecipeError(f"recipe.models[{i}].model: expected a checkpoint path, found nothing")
        path = _path(m["model"], root, f"recipe.models[{i}].model")
        # base-aware methods take the base separately; linear ignores base_model (mergekit's rule)
        if base is not None and ours != "linear" and Path(path) == Path(base):
            continue
        models.append(path)
        per_model.append(_mk_params(m.get("parameters"), mapping, f"recipe.models[{i}].parameters"))
    shared = dict(fixed)
    shared.update(_mk_params(d.get("parameters"), mapping, "recipe.parameters"))
    if shared.get("sparsify") == "magnitude_sort" and DTYPES.get(d.get("dtype")) in (DTYPES["bf16"], DTYPES["fp16"]):
        # mergekit ranks half-precision task vectors here, so its tie order cannot be reproduced
        # from our fp32 ones (the results differ by half-precision rounding anyway): the O(n)
        # trim keeps as many entries without a full sort
        shared["sparsify"] = "magnitude"
    if ours == "linear":
        base = None
    if ours in ("slerp", "model_stock") and base is None:
        raise RecipeError(f"recipe.base_model: expected a base model for {mk}, found nothing")
    # mergekit casts inputs to `dtype` and the output to `out_dtype` (default: dtype); we always
    # compute in fp32 and write out_dtype / dtype / the base's dtype.
    out = d.get("out_dtype") or d.get("dtype")
    r = Recipe(method=method, models=models, base_model=base, shared=shared, per_model=per_model,
               out_dtype=_dtype(out, "recipe.out_dtype"), source="mergekit")
    return _validate(r)


def load_recipe(path_or_dict: str | os.PathLike | Mapping) -> Recipe:
    """Read and validate a deltakit or mergekit recipe (YAML file path or an already-parsed dict)."""
    root = None
    if isinstance(path_or_dict, Mapping):
        d = path_or_dict
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise RecipeError(f"recipe: expected a YAML file at {p}, found nothing")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        root = p.parent
        if not isinstance(d, Mapping):
            raise RecipeError(f"recipe: expected a mapping at the top of {p}, found {type(d).__name__}")
    return _read_mergekit(d, root) if "merge_method" in d else _read_deltakit(d, root)


def run_recipe(path_or_dict: str | os.PathLike | Mapping | Recipe, out_dir: str | os.PathLike,
               progress: bool = True, fsync: bool = False) -> Path:
    """Load ``path_or_dict`` and stream the merge into ``out_dir`` (HF layout, atomic;
    ``fsync=True`` also makes it durable against power loss, see :func:`merge_checkpoints`)."""
    r = path_or_dict if isinstance(path_or_dict, Recipe) else load_recipe(path_or_dict)
    with tempfile.TemporaryDirectory(prefix="deltakit-merge-inputs-") as work:
        r = materialise_inputs(r, work)  # adapter directories and 'minilm' -> checkpoint directories
        return merge_checkpoints(r.models, out_dir, r.plan(), base=r.base_model, max_shard_bytes=r.shard_bytes,
                                 progress=progress, fsync=fsync)
