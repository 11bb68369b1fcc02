"""Hugging Face ``peft`` LoRA adapter directories, read and written without peft.

A peft LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys relative to the wrapped model::

    base_model.model.<path>.lora_A.weight        (r, in)    Linear / Conv1D; (r, in, kh, kw) Conv2d
    base_model.model.<path>.lora_B.weight        (out, r)   Linear / Conv1D; (out, r, 1, 1) Conv2d
    base_model.model.<path>.lora_embedding_A     (r, num_embeddings)
    base_model.model.<path>.lora_embedding_B     (dim, r)
    base_model.model.<path>[.modules_to_save].<param>   modules_to_save (full copies)

These are exactly deltakit's LoRA layouts, so import and export copy tensors
unchanged; the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) in both.

>>> import deltakit as dk                                      # doctest: +SKIP
>>> adapter = dk.io.peft.import_peft(model, "peft-adapter-dir")  # doctest: +SKIP
>>> dk.io.peft.export_peft(adapter, "out-dir")                    # doctest: +SKIP
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, adapters
from ..core.load import AdapterLoadError, attach_state
from ..core.targets import _named_modules
from ..methods.lora import LoRA, LoraConfig
from .files import DeltakitFileError, atomic_dir, read_json, write_json
from .tensors import load_tensors, save_tensors

__all__ = ["import_peft", "export_peft", "read_peft_config", "PeftFormatError", "CONFIG", "WEIGHTS"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

# peft init_lora_weights values that only choose how A/B start (the saved tensors say
# the rest) -> deltakit's LoraConfig.init. Values not listed (pissa, olora, corda,
# loftq) also rewrite the base weights, so the adapter alone does not reproduce them.
_INIT_FROM_PEFT = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "orthogonal": "orthogonal",
                   "eva": "kaiming"}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}

# Config fields that switch on something deltakit's LoRA does not do: (field, "off" values).
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None, {}),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "velora_config": (None, {}),
    "modules_to_tie": (None, []),
}

# transformers head class suffix -> peft task_type
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
               ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"))

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$")


class PeftFormatError(ValueError):
    """A peft adapter directory is malformed, unsupported, or does not fit the model."""


# ============================================================================ import
def import_peft(model: nn.Module, peft_dir: str | os.PathLike, name: str | None = None, *,
                activate: bool = True) -> Adapter:
    """Attach the peft LoRA adapter saved in ``peft_dir`` to ``model`` as a deltakit adapter.

    Targets are the modules that have LoRA tensors in the file; ``modules_to_save``
    become ``full`` deltas. Everything is read, built and checked off the model
    before the deltas are inserted, so any error leaves ``model`` unchanged.

    Raises:
        PeftFormatError: the directory uses a peft feature deltakit does not have
            (DoRA, bias training, non-uniform ``rank_pattern``...) or does not fit ``model``.
    """
    peft_dir = Path(peft_dir)
    cfg = read_peft_config(peft_dir)
    name = name or "default"
    if name in adapters(model):
        raise PeftFormatError(f"an adapter named {name!r} is already attached; pass another name")
    weights = peft_dir / WEIGHTS
    if not weights.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise PeftFormatError(f"{peft_dir}: found adapter_model.bin (pickle), which deltakit does not load; "
                              "re-save it with safe_serialization=True")
    state = load_tensors(weights)

    lora, full, base_copies = _split_keys(state, cfg, weights)
    modules = dict(_named_modules(model))  # deltakit wrappers made transparent
    paths = list(lora)
    _check_targets(model, modules, lora, full, cfg, weights)
    _check_base_copies(modules, base_copies, weights)
    r, alpha = _rank_and_alpha(lora, cfg, weights)

    config = LoraConfig(
        r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
        use_rslora=bool(cfg.get("use_rslora", False)),
        init=_INIT_FROM_PEFT.get(cfg.get("init_lora_weights", True), "kaiming"),
        targets=tuple(paths), modules_to_save=tuple(full))
    state_dict: dict[str, Tensor] = {}
    for p, (a, b) in lora.items():
        state_dict[f"{p}.lora_A"], state_dict[f"{p}.lora_B"] = a, b
    for p, tensors in full.items():
        unknown = sorted(set(tensors) - {k for k, _ in modules[p].named_parameters(recurse=False)})
        if unknown:
            raise PeftFormatError(f"{weights}: modules_to_save {p!r} has no parameter(s) {unknown}")
        state_dict.update({f"{p}.values.{k}": v for k, v in tensors.items()})
    try:
        return attach_state(model, config, state_dict, name=name, targets=paths, full_targets=list(full),
                            activate=activate, source=str(weights))
    except AdapterLoadError as e:
        raise PeftFormatError(str(e)) from None


def read_peft_config(peft_dir: Path) -> dict:
    """A peft adapter directory's config, checked: a one-line error for anything deltakit cannot import."""
    if not peft_dir.is_dir():
        raise DeltakitFileError(f"expected a peft adapter directory at {peft_dir}, "
                                f"found {'a file' if peft_dir.exists() else 'nothing'}")
    cfg = read_json(peft_dir / CONFIG)
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise PeftFormatError(f"{peft_dir / CONFIG}: peft_type {kind!r} is not supported; deltakit imports LORA only")
    for field, off in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in off:
            raise PeftFormatError(f"{peft_dir / CONFIG}: {field}={cfg[field]!r} is not supported by deltakit's LoRA")
    if cfg.get("bias", "none") != "none":
        raise PeftFormatError(f"{peft_dir / CONFIG}: bias={cfg['bias']!r} (trained biases) is not supported; "
                              "only bias='none'")
    init = cfg.get("init_lora_weights", True)
    if init not in _INIT_FROM_PEFT:
        raise PeftFormatError(f"{peft_dir / CONFIG}: init_lora_weights={init!r} changes the base weights, so the "
                              "adapter alone does not reproduce the model; convert it with peft's "
                              "path_initial_model_for_weight_conversion first")
    return cfg


def _split_keys(state: dict[str, Tensor], cfg: dict, weights: Path):
    """-> ({path: (A, B)}, {path: {param: tensor}}, {path.param: base tensor}) in file order."""
    base_copies: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    full: dict[str, dict[str, Tensor]] = {}
    mts = cfg.get("modules_to_save") or []
    for key, t in state.items():
        if "lora_magnitude_vector" in key:
            raise PeftFormatError(f"{weights}: tensor {key!r} is a DoRA magnitude; DoRA adapters are not supported")
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"{weights}: tensor {key!r} does not start with {PREFIX!r}; not a peft LoRA file")
        rest = key[len(PREFIX):]
        m = _LORA_KEY.match(rest)
        if m:
            which = (m["lin"] or m["emb"])[-1]
            lora.setdefault(m["path"], {})[which] = t
            continue
        path, _, param = rest.rpartition(".")
        if path.endswith(".base_layer"):
            base_copies[f"{path[:-len('.base_layer')]}.{param}"] = t
            continue
        path = path.replace(".modules_to_save", "")  # older peft kept the wrapper's name
        if not any(path.endswith(s) for s in mts):
            raise PeftFormatError(f"{weights}: tensor {key!r} is neither a LoRA factor nor in modules_to_save "
                                  f"{mts}")
        full.setdefault(path, {})[param] = t
    if not lora:
        raise PeftFormatError(f"{weights}: no LoRA tensors (lora_A / lora_B / lora_embedding_A / _B) found")
    pairs = {}
    for path, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise PeftFormatError(f"{weights}: module {path!r} has lora_{''.join(sorted(ab))} but not both A and B")
        pairs[path] = (ab["A"], ab["B"])
    return pairs, full, base_copies


def _check_targets(model: nn.Module, modules: dict[str, nn.Module], lora, full, cfg: dict, weights: Path) -> None:
    for path in [*lora, *full]:
        if path not in modules:
            raise PeftFormatError(f"{weights}: module {path!r} does not exist in {type(model).__name__}")
    for path, (a, b) in lora.items():
        base = modules[path]
        if not LoRA.supports(base):
            raise PeftFormatError(f"{weights}: target {path!r} is a {type(base).__name__}; deltakit's LoRA "
                                  "supports Linear, Conv1D, Conv2d, Embedding")
        if a.shape[0] != b.shape[1]:
            raise PeftFormatError(f"{weights}: {path}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
    # Every supported module the config targets must have tensors (a truncated file
    # would otherwise import as a smaller adapter). Only for plain target_modules.
    tm = cfg.get("target_modules")
    if tm and tm != "all-linear" and not cfg.get("layers_to_transform") and not cfg.get("exclude_modules"):
        mts = cfg.get("modules_to_save") or []
        for path, mod in modules.items():
            if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in mts):
                continue
            hit = (re.fullmatch(tm, path) is not None if isinstance(tm, str)
                   else path in tm or any(path.endswith("." + t) for t in tm))
            if hit and LoRA.supports(mod) and path not in lora:
                raise PeftFormatError(f"{weights}: target_modules {tm!r} selects {path!r}, but the file has "
                                      "no LoRA tensors for it (truncated file or different base model?)")


def _check_base_copies(modules: dict[str, nn.Module], copies: dict[str, Tensor], weights: Path) -> None:
    """peft may store a targeted embedding's base weight (``save_embedding_layers``);
    fine when it equals the model's, otherwise the adapter expects a different
    (e.g. resized) base, which deltakit does not swap in."""
    for key, t in copies.items():
        path, _, param = key.rpartition(".")
        have = getattr(modules.get(path), param, None)
        if not isinstance(have, Tensor) or have.shape != t.shape or not torch.equal(have.detach().cpu(), t.to(have.dtype)):
            raise PeftFormatError(f"{weights}: the file carries base weights for {key!r} that differ from the model's "
                                  "(resized or trained embeddings); load them into the base model first")


def _rank_and_alpha(lora, cfg: dict, weights: Path) -> tuple[int, float]:
    """One (r, alpha) for all targets: ranks from the tensors, alpha from the config
    (``alpha_pattern`` resolved as peft does). Non-uniform values are an error."""
    from_pattern = _pattern_lookup(cfg.get("alpha_pattern") or {})
    ranks = {p: int(a.shape[0]) for p, (a, _) in lora.items()}
    alphas = {p: float(from_pattern(p, cfg.get("lora_alpha", 8))) for p in lora}
    for what, values in (("rank (r / rank_pattern)", ranks), ("lora_alpha (alpha_pattern)", alphas)):
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            examples = {v: next(p for p in values if values[p] == v) for v in distinct}
            raise PeftFormatError(f"{weights}: non-uniform {what} across targets is not supported: "
                                  + ", ".join(f"{v:g} at {p!r}" for v, p in examples.items()))
    r = next(iter(ranks.values()))
    alpha = next(iter(alphas.values()))
    declared = _pattern_lookup(cfg.get("rank_pattern") or {})
    want = {declared(p, cfg.get("r", r)) for p in lora}
    if want != {r}:
        raise PeftFormatError(f"{weights}: tensors have rank {r}, the config declares r={sorted(want)}")
    return r, alpha


def _pattern_lookup(pattern: dict):
    """peft's ``get_pattern_key``: the first key matching the end of the path on a '.' boundary."""
    def look(path: str, default):
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default
    return look


# ============================================================================ export
def export_peft(adapter: Adapter, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter`` (a LoRA adapter) as a peft LoRA directory, atomically.

    ``out_dir`` is replaced as a whole if it exists and is empty or already a peft
    adapter directory; anything else is refused.
    """
    if adapter.spec.name != "lora":
        raise PeftFormatError(f"export_peft writes LoRA adapters; adapter {adapter.name!r} uses method "
                              f"{adapter.spec.name!r}")
    config: LoraConfig = adapter.config  # type: ignore[assignment]
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PeftFormatError(f"{out_dir} exists and is a file; expected a directory to write")
        if any(out_dir.iterdir()) and not (out_dir / CONFIG).is_file():
            raise PeftFormatError(f"{out_dir} exists and is not a peft adapter directory; refusing to replace it")

    tensors: dict[str, Tensor] = {}
    lora_paths, full_paths, conv1d = [], [], []
    for path, delta in adapter.deltas(include_full=True):
        if adapter.targets[path] == "full":
            full_paths.append(path)
            for k, v in delta.values.items():
                tensors[f"{PREFIX}{path}.{k}"] = v.detach()
            continue
        lora_paths.append(path)
        if delta.layout == "embedding":
            tensors[f"{PREFIX}{path}.lora_embedding_A"] = delta.lora_A.detach()
            tensors[f"{PREFIX}{path}.lora_embedding_B"] = delta.lora_B.detach()
        else:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = delta.lora_A.detach()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = delta.lora_B.detach()
        conv1d.append(delta.layout == "conv1d")

    peft_cfg = {
        "peft_type": "LORA",
        "task_type": _task_type(adapter.model, full_paths),
        "base_model_name_or_path": _portable_base_name(adapter.model),
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(lora_paths),
        "exclude_modules": None,
        "fan_in_fan_out": bool(conv1d) and all(conv1d),
        "bias": "none",
        "modules_to_save": sorted(full_paths) or None,
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    with atomic_dir(out_dir, kind="peft") as tmp:
        save_tensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
        write_json(tmp / CONFIG, peft_cfg)
    return out_dir


# peft task types that add the model's head to modules_to_save when it loads the adapter
# (peft's PeftModelForSequenceClassification etc.): the file must then hold the head.
_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
          "QUESTION_ANS": ("qa_outputs",)}


def _task_type(model: nn.Module, saved: list[str]) -> str | None:
    """peft's task_type for ``model``'s head class, or None (a plain PeftModel) when that
    task type would make peft expect a head the adapter does not save: peft then adds the
    head to modules_to_save and ``PeftModel.from_pretrained`` fails with a KeyError on it."""
    cls = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if cls.endswith(suffix):
            heads = _HEADS.get(task)
            if heads and not any(p == h or p.endswith("." + h) for p in saved for h in heads):
                return None
            return task
    return None


def _portable_base_name(model: nn.Module) -> str | None:
    """The base's name for peft users: the bundled MiniLM's hub id rather than a path into
    this machine's site-packages."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name is None:
        return None
    from .models import BUNDLED, BUNDLED_HUB_ID, SMOLLM2, resolve_model
    from .smollm2 import HUB_ID as SMOLLM2_HUB_ID
    if name == SMOLLM2:
        return SMOLLM2_HUB_ID
    try:
        bundled_dir = Path(resolve_model(BUNDLED)).resolve()
    except ImportError:
        bundled_dir = None
    if name == BUNDLED or (bundled_dir is not None and Path(name).resolve() == bundled_dir):
        return BUNDLED_HUB_ID
    return name

