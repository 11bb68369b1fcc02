"""Hugging Face ``peft`` adapter directories, read and written without peft.

A peft directory holds ``adapter_config.json`` (``peft_type`` names the method) and
``adapter_model.safetensors`` with keys relative to the wrapped model::

    base_model.model.<path>.<method tensor>              e.g. lora_A.weight, ia3_l
    base_model.model.<path>[.modules_to_save].<param>    modules_to_save (full copies)

This module does what every method shares (files, ``modules_to_save``, stored base
weights, atomic writes, task type); each peft method's tensors and config fields are
converted by a small converter in ``deltakit.io.peft_methods`` (one file per method).

>>> import deltakit as dk                                      # doctest: +SKIP
>>> adapter = dk.io.peft.import_peft(model, "peft-adapter-dir")  # doctest: +SKIP
>>> dk.io.peft.export_peft(adapter, "out-dir")                    # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, adapters
from ..core.load import AdapterLoadError, attach_state
from ..core.targets import _named_modules
from .files import DeltakitFileError, atomic_dir, read_json, write_json
from .peft_methods import (PeftConverter, PeftFormatError, PeftSource, converter_for_method,
                           converter_for_peft_type)
from .tensors import load_tensors, save_tensors

__all__ = ["import_peft", "export_peft", "read_peft_config", "PeftFormatError", "CONFIG", "WEIGHTS"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# transformers head class suffix -> peft task_type
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
               ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"))


# ============================================================================ import
def import_peft(model: nn.Module, peft_dir: str | os.PathLike, name: str | None = None, *,
                activate: bool = True) -> Adapter:
    """Attach the peft adapter saved in ``peft_dir`` to ``model`` as a deltakit adapter.

    Targets are the modules that have the method's tensors in the file;
    ``modules_to_save`` become ``full`` deltas. Everything is read, built and checked
    off the model before the deltas are inserted, so any error leaves ``model`` unchanged.

    Raises:
        PeftFormatError: the directory uses a peft method or feature deltakit does not
            have, or does not fit ``model``.
    """
    peft_dir = Path(peft_dir)
    cfg = read_peft_config(peft_dir)
    conv = converter_for_peft_type(cfg.get("peft_type"), peft_dir / CONFIG)
    name = name or "default"
    if name in adapters(model):
        raise PeftFormatError(f"an adapter named {name!r} is already attached; pass another name")
    weights = peft_dir / WEIGHTS
    if not weights.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise PeftFormatError(f"{peft_dir}: found adapter_model.bin (pickle), which deltakit does not load; "
                              "re-save it with safe_serialization=True")
    own, full, base_copies, shared = _split_keys(load_tensors(weights), cfg, conv, weights)
    modules = dict(_named_modules(model))  # deltakit wrappers made transparent
    _check_base_copies(modules, base_copies, weights)
    src = PeftSource(cfg=cfg, tensors=own, full=tuple(full), modules=modules, where=weights,
                     config_file=peft_dir / CONFIG, model=model, shared=shared)
    got = conv.to_deltakit(src)
    state = dict(got.state)
    for p, tensors in full.items():
        if p not in modules:
            raise PeftFormatError(f"{weights}: module {p!r} does not exist in {type(model).__name__}")
        unknown = sorted(set(tensors) - {k for k, _ in modules[p].named_parameters(recurse=False)})
        if unknown:
            raise PeftFormatError(f"{weights}: modules_to_save {p!r} has no parameter(s) {unknown}")
        state.update({f"{p}.values.{k}": v for k, v in tensors.items()})
    try:
        return attach_state(model, got.config, state, name=name, targets=got.targets, full_targets=list(full),
                            activate=activate, source=str(weights))
    except AdapterLoadError as e:
        raise PeftFormatError(str(e)) from None


def read_peft_config(peft_dir: Path) -> dict:
    """A peft adapter directory's config, checked: a one-line error for anything deltakit cannot import."""
    if not peft_dir.is_dir():
        raise DeltakitFileError(f"expected a peft adapter directory at {peft_dir}, "
                                f"found {'a file' if peft_dir.exists() else 'nothing'}")
    cfg = read_json(peft_dir / CONFIG)
    converter_for_peft_type(cfg.get("peft_type"), peft_dir / CONFIG).check_config(cfg, peft_dir / CONFIG)
    return cfg


def _split_keys(state: dict[str, Tensor], cfg: dict, conv: PeftConverter, weights: Path):
    """-> ({path: {method tensor: t}}, {path: {param: t}} for modules_to_save,
    {path.param: stored base tensor}, {full key: shared tensor}), each in file order."""
    shared: dict[str, Tensor] = {}
    own: dict[str, dict[str, Tensor]] = {}
    full: dict[str, dict[str, Tensor]] = {}
    base_copies: dict[str, Tensor] = {}
    mts = cfg.get("modules_to_save") or []
    for key, t in state.items():
        if conv.shared_key is not None and conv.shared_key.fullmatch(key):
            shared[key] = t
            continue
        if not key.startswith(conv.prefix):
            raise PeftFormatError(f"{weights}: tensor {key!r} does not start with {conv.prefix!r}; not a peft "
                                  f"{conv.peft_type} file")
        rest = key[len(conv.prefix):]
        m = conv.key.match(rest)
        if m:
            own.setdefault(m["path"], {})[m["param"]] = t
            continue
        path, _, param = rest.rpartition(".")
        if path.endswith(".base_layer"):
            base_copies[f"{path[:-len('.base_layer')]}.{param}"] = t
            continue
        path = path.replace(".modules_to_save", "")  # older peft kept the wrapper's name
        if not any(path.endswith(s) for s in mts):
            raise PeftFormatError(f"{weights}: tensor {key!r} is neither a {conv.peft_type} tensor nor in "
                                  f"modules_to_save {mts}")
        full.setdefault(path, {})[param] = t
    if not own and not shared:
        raise PeftFormatError(f"{weights}: no {conv.peft_type} tensors found")
    return own, full, base_copies, shared


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


# ============================================================================ export
def export_peft(adapter: Adapter, out_dir: str | os.PathLike) -> Path:
    """Write ``adapter`` as a peft adapter directory of its method, atomically.

    ``out_dir`` is replaced as a whole if it exists and is empty or already a peft
    adapter directory; anything else is refused.
    """
    conv = converter_for_method(adapter)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PeftFormatError(f"{out_dir} exists and is a file; expected a directory to write")
        if any(out_dir.iterdir()) and not (out_dir / CONFIG).is_file():
            raise PeftFormatError(f"{out_dir} exists and is not a peft adapter directory; refusing to replace it")
    got = conv.from_deltakit(adapter)
    tensors = {**got.shared, **{f"{conv.prefix}{k}": v for k, v in got.tensors.items()}}
    full_paths = []
    for path, delta in adapter.deltas(include_full=True):
        if adapter.targets[path] == "full":
            full_paths.append(path)
            tensors.update({f"{conv.prefix}{path}.{k}": v.detach() for k, v in delta.values.items()})
    peft_cfg = {
        "task_type": _task_type(adapter.model, full_paths),
        "base_model_name_or_path": _portable_base_name(adapter.model),
        "revision": None,
        "inference_mode": True,
        "modules_to_save": sorted(full_paths) or None,
        **got.config,
    }
    if conv.needs_task_type and peft_cfg["task_type"] is None:
        raise PeftFormatError(f"peft applies {conv.peft_type} only through a task model (CAUSAL_LM, or SEQ_CLS "
                              f"with its head saved): {type(adapter.model).__name__} "
                              f"{'without its head in modules_to_save ' if full_paths == [] else ''}has none")
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

