"""The search YAML: what to train on, the space, the objectives, the sampler, the budget.

::

    name: sst2-search            # the study's name in the storage (default: the file's stem)
    task:
      model: minilm              # the base (a directory, a hub id or the bundled 'minilm')
      train: ../shared/data/text/sst2   # a GLUE-style directory or a file; its train split only
      holdout: 0.2               # fraction of the training rows held out for the metric (never dev)
      max_rows: 2000             # subsample the training rows first
      max_length: 64
      batch_size: 16
      metric: accuracy           # accuracy, f1, f1_macro or mcc
      codec: topk                # optional: 'bytes' = the weight deltas compressed by this codec
      codec_knobs: {density: 0.1}
    preset: autopeft             # optional: start from a shipped space (its entries, then yours)
    methods: {lora: {r: [2, 64]}, houlsby: {}}    # see deltakit.search.space
    training: {lr: [1e-4, 1e-2], steps: 200}
    objectives: [metric, params]  # any of metric, params, bytes, latency
    sampler: tpe                 # tpe, nsga2, gp, random
    trials: 30                   # finished (complete + pruned) trials the study ends with
    fidelity: {min_steps: 25, eta: 3, kind: halving}   # or hyperband; omit for full runs only
    seed: 0

``task: toy`` replaces training by a cheap analytic function of the sampled point
(:func:`deltakit.search.objectives.toy_values`), for trying a storage or a cluster.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .space import Space, SpaceError, build_space

__all__ = ["SearchSpec", "TaskSpec", "FidelitySpec", "load_spec", "parse_spec", "PRESETS", "OBJECTIVES", "SAMPLERS"]

#: objective name -> direction
OBJECTIVES = {"metric": "maximize", "params": "minimize", "bytes": "minimize", "latency": "minimize"}
SAMPLERS = ("tpe", "nsga2", "gp", "random")
_METRICS = ("accuracy", "f1", "f1_macro", "mcc")

#: shipped spaces, written in the same YAML a user writes (no code tables)
PRESETS: dict[str, str] = {
    # AutoPEFT (Zhou et al. 2024, https://arxiv.org/abs/2301.12132) over He et al.'s unified
    # method: adapter size (serial = sequential insertion, or parallel), prefix length (0 = off,
    # AutoPEFT's grid) and one on/off switch per layer. One unified config has one branch per
    # site, so a point is a serial OR a parallel adapter, not both at once as in AutoPEFT.
    "autopeft": """
methods:
  unified:
    insertion: [sequential, parallel]
    position: [attention, ffn, both]
    composition: [additive, scaled]
    r: {low: 1, high: 384, log: true}
    prefix_length: {choices: [0, 1, 3, 6, 12, 24, 48]}
    layers: switch
""",
}
_TOP = {"name", "task", "preset", "methods", "drop", "fields", "training", "objectives", "sampler", "trials",
        "fidelity", "seed"}


@dataclass(frozen=True)
class TaskSpec:
    model: str = "minilm"
    train: str | None = None
    holdout: float = 0.2
    max_rows: int | None = None
    max_length: int = 64
    batch_size: int = 16
    metric: str = "accuracy"
    codec: str | None = None     # bytes: the adapter's weight deltas compressed by this codec
    codec_knobs: dict = field(default_factory=dict)
    toy: bool = False
    toy_seconds: float = 0.0  # toy: seconds each trial sleeps (a stand-in for training time)


@dataclass(frozen=True)
class FidelitySpec:
    min_steps: int
    eta: int = 3
    kind: str = "halving"


@dataclass(frozen=True)
class SearchSpec:
    name: str
    task: TaskSpec
    space_doc: dict[str, Any]
    objectives: tuple[str, ...] = ("metric", "params")
    sampler: str = "tpe"
    trials: int = 20
    fidelity: FidelitySpec | None = None
    seed: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def space(self, num_layers: int | None = None) -> Space:
        return build_space(self.space_doc, num_layers=num_layers)


def load_spec(path: str | Path) -> SearchSpec:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"expected a search YAML file, found nothing at {p}")
    doc = yaml.safe_load(p.read_text())
    return parse_spec(doc, default_name=p.stem, where=p.name)


def parse_spec(doc: Any, *, default_name: str = "deltakit-search", where: str = "space") -> SearchSpec:
    """Check and read a search YAML mapping (every error one line naming the entry)."""
    if not isinstance(doc, Mapping):
        raise SpaceError(f"{where}: expected a mapping, found {type(doc).__name__}")
    unknown = sorted(set(doc) - _TOP)
    if unknown:
        raise SpaceError(f"{where}.{unknown[0]}: expected one of {sorted(_TOP)}, found {unknown[0]!r}")
    space_doc = _with_preset(doc, where)
    objectives = _objectives(doc.get("objectives", ["metric", "params"]), where)
    sampler = doc.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpaceError(f"{where}.sampler: expected one of {list(SAMPLERS)}, found {sampler!r}")
    trials = _int(doc.get("trials", 20), f"{where}.trials", 1)
    spec = SearchSpec(str(doc.get("name", default_name)), _task(doc.get("task"), where), space_doc, objectives,
                      sampler, trials, _fidelity(doc.get("fidelity"), where), _int(doc.get("seed", 0), f"{where}.seed", 0),
                      dict(doc))
    spec.space(num_layers=2)  # every space error now, before any work (2: a stand-in for the model's layers)
    return spec


def _with_preset(doc: Mapping, where: str) -> dict[str, Any]:
    keys = ("methods", "drop", "fields", "training")
    preset = doc.get("preset")
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise SpaceError(f"{where}.preset: expected one of {sorted(PRESETS)}, found {preset!r}")
        base = yaml.safe_load(PRESETS[preset])
    out = {k: base[k] for k in keys if k in base}
    for k in keys:
        if k not in doc:
            continue
        if k == "methods" and isinstance(doc[k], Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **{m: {**(out[k].get(m) or {}), **(v or {})} for m, v in doc[k].items()}}
        else:
            out[k] = doc[k]
    return out


def _objectives(v: Any, where: str) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or any(o not in OBJECTIVES for o in items) \
            or len(set(items)) != len(items):
        raise SpaceError(f"{where}.objectives: expected distinct names from {list(OBJECTIVES)}, found {v!r}")
    return tuple(items)


def _int(v: Any, where: str, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise SpaceError(f"{where}: expected an integer >= {low}, found {v!r}")
    return v


def _task(v: Any, where: str) -> TaskSpec:
    if v == "toy":
        return TaskSpec(toy=True)
    if not isinstance(v, Mapping):
        raise SpaceError(f"{where}.task: expected a mapping (model, train, ...) or 'toy', found {v!r}")
    known = set(TaskSpec.__dataclass_fields__)
    unknown = sorted(set(v) - known)
    if unknown:
        raise SpaceError(f"{where}.task.{unknown[0]}: expected one of {sorted(known)}, found {unknown[0]!r}")
    t = TaskSpec(**v)
    if not t.toy and not t.train:
        raise SpaceError(f"{where}.task.train: expected a training file or GLUE-style directory, found nothing")
    if not (isinstance(t.holdout, (int, float)) and 0 < t.holdout < 1):
        raise SpaceError(f"{where}.task.holdout: expected a number in (0, 1), found {t.holdout!r}")
    if t.codec is not None:
        from ..compress._registry import build_compressor_config
        try:
            build_compressor_config(t.codec, t.codec_knobs, where=f"{where}.task.codec_knobs")
        except (ValueError, KeyError) as e:
            msg = str(e).splitlines()[0]
            raise SpaceError(msg if msg.startswith(where) else f"{where}.task.codec: {msg}") from None
    if t.metric not in _METRICS:
        raise SpaceError(f"{where}.task.metric: expected one of {list(_METRICS)}, found {t.metric!r}")
    return t


def _fidelity(v: Any, where: str) -> FidelitySpec | None:
    if v is None:
        return None
    if not isinstance(v, Mapping) or "min_steps" not in v or set(v) - {"min_steps", "eta", "kind"}:
        raise SpaceError(f"{where}.fidelity: expected {{min_steps, eta, kind}}, found {v!r}")
    kind = v.get("kind", "halving")
    if kind not in ("halving", "hyperband"):
        raise SpaceError(f"{where}.fidelity.kind: expected 'halving' or 'hyperband', found {kind!r}")
    return FidelitySpec(_int(v["min_steps"], f"{where}.fidelity.min_steps", 1),
                        _int(v.get("eta", 3), f"{where}.fidelity.eta", 2), kind)
