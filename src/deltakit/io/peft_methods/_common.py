"""What every peft method converter shares: the registry, the converter protocol, and the
small records passed between ``deltakit.io.peft`` (files, modules_to_save, attach) and a
converter (one method's tensors and config fields)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from ...core.adapter import Adapter
from ...core.registry import DeltaConfig

PREFIX = "base_model.model."


class PeftFormatError(ValueError):
    """A peft adapter directory is malformed, unsupported, or does not fit the model."""


@dataclass(frozen=True)
class PeftSource:
    """One peft adapter, read and split, as a converter sees it.

    ``tensors`` maps each module path to its method tensors, keyed by the part of the
    peft key after the path (``lora_A.weight``, ``ia3_l``...); ``full`` are the
    ``modules_to_save`` paths (deltakit ``full`` targets, handled by the caller).
    """

    cfg: dict
    tensors: dict[str, dict[str, Tensor]]
    full: tuple[str, ...]
    modules: dict[str, nn.Module]
    where: Path  # the weights file, for messages
    config_file: Path
    model: nn.Module
    shared: dict[str, Tensor] = field(default_factory=dict)  # full keys matched by ``shared_key``


@dataclass(frozen=True)
class PeftImport:
    """A converter's answer: a deltakit config (with ``targets`` and ``modules_to_save``) and
    tensors keyed as ``Adapter.state_dict()`` for the method's targets (not the full copies)."""

    config: DeltaConfig
    state: dict[str, Tensor]
    targets: list[str]


@dataclass(frozen=True)
class PeftExport:
    """A converter's answer on export: the method's peft config fields (``peft_type`` and
    ``target_modules`` included) and its tensors keyed relative to the converter's ``prefix``."""

    config: dict
    tensors: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)  # full keys (outside ``PREFIX``), e.g. VeRA's


class PeftConverter:
    """One peft method <-> deltakit method(s). Subclasses set the class fields and override
    the two conversions; ``check_config`` refuses what the method cannot represent."""

    peft_type: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = ()  # deltakit methods exported as ``peft_type``
    key: ClassVar[re.Pattern]  # ``<path>.<param>`` of this method's tensors (groups ``path``, ``param``)
    shared_key: ClassVar[re.Pattern | None] = None  # full keys of tensors shared by all targets
    # where module keys start: "base_model." for peft's prompt-learning methods (no LoRA-style wrapper)
    prefix: ClassVar[str] = PREFIX
    # prompt-learning methods act only through a task-specific PeftModel (CAUSAL_LM, SEQ_CLS...)
    needs_task_type: ClassVar[bool] = False

    def check_config(self, cfg: dict, config_file: Path) -> None:
        """Raise ``PeftFormatError`` for a config field the deltakit method cannot represent."""

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        raise NotImplementedError

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        raise PeftFormatError(f"deltakit cannot export peft {self.peft_type} adapters")


_BY_PEFT_TYPE: dict[str, PeftConverter] = {}
_BY_METHOD: dict[str, PeftConverter] = {}


def register_converter(cls: type[PeftConverter]) -> type[PeftConverter]:
    """Class decorator: register one instance under its ``peft_type`` and ``methods``."""
    conv = cls()
    if cls.peft_type in _BY_PEFT_TYPE:
        raise ValueError(f"a peft converter for {cls.peft_type!r} is already registered")
    clash = sorted(set(cls.methods) & set(_BY_METHOD))
    if clash:
        raise ValueError(f"deltakit method(s) {clash} already export through another peft converter")
    _BY_PEFT_TYPE[cls.peft_type] = conv
    _BY_METHOD.update({m: conv for m in cls.methods})
    return cls


def converter_for_peft_type(kind: object, config_file: Path) -> PeftConverter:
    if kind not in _BY_PEFT_TYPE:
        raise PeftFormatError(f"{config_file}: peft_type {kind!r} is not supported; deltakit imports "
                              f"{', '.join(sorted(_BY_PEFT_TYPE))}")
    return _BY_PEFT_TYPE[kind]  # type: ignore[index]


def converter_for_method(adapter: Adapter) -> PeftConverter:
    name = adapter.spec.name
    if name not in _BY_METHOD:
        raise PeftFormatError(f"export_peft writes {', '.join(sorted(_BY_METHOD))} adapters; adapter "
                              f"{adapter.name!r} uses method {name!r}")
    return _BY_METHOD[name]


def pattern_lookup(pattern: dict):
    """peft's ``get_pattern_key``: the first key matching the end of the path on a '.' boundary."""
    def look(path: str, default):
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default
    return look


def check_complete(src: PeftSource, supports, kind: str) -> None:
    """Every supported module the config's plain ``target_modules`` selects must have tensors:
    a truncated file would otherwise import as a smaller adapter."""
    cfg, tm = src.cfg, src.cfg.get("target_modules")
    if not tm or tm == "all-linear" or cfg.get("layers_to_transform") or cfg.get("exclude_modules"):
        return
    mts = cfg.get("modules_to_save") or []
    for path, mod in src.modules.items():
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in mts):
            continue
        hit = (re.fullmatch(tm, path) is not None if isinstance(tm, str)
               else path in tm or any(path.endswith("." + t) for t in tm))
        if hit and supports(mod) and path not in src.tensors:
            raise PeftFormatError(f"{src.where}: target_modules {tm!r} selects {path!r}, but the file has "
                                  f"no {kind} tensors for it (truncated file or different base model?)")


def check_paths(src: PeftSource, supports, supported_names: str, method: str) -> None:
    """Each path with tensors exists in the model and is a module type ``method`` supports."""
    for path in [*src.tensors, *src.full]:
        if path not in src.modules:
            raise PeftFormatError(f"{src.where}: module {path!r} does not exist in {type(src.model).__name__}")
    for path in src.tensors:
        base = src.modules[path]
        if not supports(base):
            raise PeftFormatError(f"{src.where}: target {path!r} is a {type(base).__name__}; deltakit's "
                                  f"{method} supports {supported_names}")


def refuse_fields(cfg: dict, config_file: Path, unsupported: dict[str, tuple], method: str) -> None:
    """``unsupported``: config field -> its "off" values; any other value is an error."""
    for name, off in unsupported.items():
        if name in cfg and cfg[name] not in off:
            raise PeftFormatError(f"{config_file}: {name}={cfg[name]!r} is not supported by deltakit's {method}")


def uniform_rank_alpha(src: PeftSource, ranks: dict[str, int], method: str) -> tuple[int, float]:
    """One (r, alpha) for a LyCORIS-style adapter (config ``r`` / ``alpha`` with peft's
    ``rank_pattern`` / ``alpha_pattern``): ``ranks`` are read from the tensors and must
    equal what the config declares; a non-uniform pattern is an error, as deltakit's
    config has one rank and one alpha."""
    cfg = src.cfg
    rank_of, alpha_of = pattern_lookup(cfg.get("rank_pattern") or {}), pattern_lookup(cfg.get("alpha_pattern") or {})
    for p, r in ranks.items():
        declared = rank_of(p, cfg.get("r", r))
        if declared != r:
            raise PeftFormatError(f"{src.where}: {p!r} has rank {r} tensors, the config declares r={declared}")
    alphas = {p: float(alpha_of(p, cfg.get("alpha", 8))) for p in ranks}
    for what, values in (("rank (r / rank_pattern)", ranks), ("alpha (alpha_pattern)", alphas)):
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            examples = ", ".join(f"{v:g} at {next(p for p in values if values[p] == v)!r}" for v in distinct)
            raise PeftFormatError(f"{src.where}: non-uniform {what} across targets is not supported by "
                                  f"deltakit's {method}: {examples}")
    return next(iter(ranks.values())), next(iter(alphas.values()))


def per_target_scales(cfg: dict, ranks: dict[str, int], alpha_key: str, rslora: bool,
                      where: object) -> tuple[int, float, dict[str, float]]:
    """One (r, alpha) for an adapter whose peft targets may differ in rank and alpha
    (``rank_pattern`` / ``alpha_pattern``), and each target's gain ``its scale / the
    adapter's``: ``ranks`` come from the tensors and must equal what the config declares;
    r is the largest, alpha that of the first target with it (whose tensors stay bit for
    bit). Callers zero-pad smaller ranks to r and multiply one factor by the gain."""
    rank_of, alpha_of = pattern_lookup(cfg.get("rank_pattern") or {}), pattern_lookup(cfg.get("alpha_pattern") or {})
    for p, r in ranks.items():
        declared = rank_of(p, cfg.get("r", r))
        if declared != r:
            raise PeftFormatError(f"{where}: {p!r} has rank {r} tensors, the config declares r={declared}")
    alphas = {p: float(alpha_of(p, cfg.get(alpha_key, 8))) for p in ranks}

    def scale(alpha: float, r: int) -> float:
        return alpha / (math.sqrt(r) if rslora else r)

    r = max(ranks.values())
    alpha = alphas[next(p for p in ranks if ranks[p] == r)]
    return r, alpha, {p: scale(alphas[p], ranks[p]) / scale(alpha, r) for p in ranks}


def number(x: float) -> float | int:
    """An alpha as peft writes it (an int when whole)."""
    return int(x) if float(x).is_integer() else x


def linear_or_conv2d_only(adapter: Adapter, method: str) -> None:
    """peft's LyCORIS methods wrap nn.Linear / nn.Conv2d (and Conv1d), not GPT-2's Conv1D."""
    for path, _ in adapter.deltas():
        base = base_module(adapter, path)
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise PeftFormatError(f"adapter {adapter.name!r}: target {path!r} is a {type(base).__name__}; peft's "
                                  f"{method} supports Linear and Conv2d only")


def base_module(adapter: Adapter, path: str) -> nn.Module:
    """The base module at ``path`` under the adapter's wrapper."""
    from ...core.targets import _named_modules
    return dict(_named_modules(adapter.model))[path]
