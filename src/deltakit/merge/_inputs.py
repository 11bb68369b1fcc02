"""Recipe inputs that are not checkpoint directories: deltakit adapters and the bundled model.

``deltakit merge`` merges checkpoints. So that ``train -> merge -> eval`` needs no Python,
a recipe may also name

- a deltakit adapter directory: it becomes the fine-tuned checkpoint ``base + adapter``,
  written by streaming ``TaskVector.from_adapter`` onto the base checkpoint (one tensor at
  a time, LoRA factors stay factored until their tensor is written);
- ``minilm`` (the bundled model): with adapters present it means the adapters' base
  (the same class and head), otherwise the bundled checkpoint directory.

With adapters, the base is materialised first as the class the adapters were trained on
(e.g. ``BertForSequenceClassification`` with their number of labels, head seeded with 0),
so its tensor names match theirs and its ``config.json`` / tokenizer make the merged output
a checkpoint ``deltakit eval`` loads. A recipe without ``base_model`` gets this base. All
materialised checkpoints live in a temporary directory removed when the merge ends.
Materialising on disk (rather than a lazy in-memory source) keeps the executor unchanged
and memory bounded by one base model plus one tensor.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from deltakit.io.adapter_files import MANIFEST, load_adapter, read_manifest
from deltakit.io.models import BUNDLED, load_base_for, resolve_model

from ._registry import MergeConfigError

__all__ = ["is_adapter", "materialise_inputs"]


def is_adapter(src: str | os.PathLike | None) -> bool:
    return src is not None and (Path(src) / MANIFEST).is_file()


def _same_base(mans: dict[str, dict]) -> dict:
    """The one base every adapter was trained on; different classes / head sizes / names are an error."""
    (first_path, first), *rest = mans.items()
    want = {k: (first.get("base_model") or {}).get(k) for k in ("name_or_path", "class", "num_labels")}
    for path, man in rest:
        got = {k: (man.get("base_model") or {}).get(k) for k in want}
        if got != want:
            key = next(k for k in want if got[k] != want[k])
            raise MergeConfigError(f"recipe.models: expected adapters on one base, found {key} {want[key]!r} "
                                   f"in {first_path} and {got[key]!r} in {path}")
    return first


def materialise_inputs(recipe, workdir: str | os.PathLike):
    """A copy of ``recipe`` whose models and base are checkpoint directories (see the module doc)."""
    models = list(recipe.models)
    adapters = {m: read_manifest(m) for m in models if is_adapter(m)}
    if is_adapter(recipe.base_model):
        raise MergeConfigError(f"recipe.base_model: expected a base model, found the adapter {recipe.base_model}")
    if not adapters:
        named = [resolve_model(m) if m == BUNDLED else m for m in models]
        base = resolve_model(recipe.base_model) if recipe.base_model == BUNDLED else recipe.base_model
        return dataclasses.replace(recipe, models=named, base_model=base)
    for path, man in adapters.items():
        if man.get("kind") != "weight":
            raise MergeConfigError(f"recipe.models: {path} uses {man.get('method')!r}, an activation delta "
                                   f"with no weight change to merge")
    man = _same_base(adapters)
    workdir = Path(workdir)
    base_dir = workdir / "base"
    model = _write_base(man, recipe.base_model, base_dir)
    done = {}
    for i, path in enumerate(models):
        if path in adapters and path not in done:
            done[path] = str(_write_finetuned(model, path, base_dir, workdir / f"model{i}"))
    models = [done.get(m, str(base_dir) if m == BUNDLED else m) for m in models]
    return dataclasses.replace(recipe, models=models, base_model=str(base_dir))


def _write_base(man: dict, base_model: str | None, out: Path):
    """Load the adapters' base (``base_model`` overrides the manifest's) and save it to ``out``."""
    model, path = load_base_for(man, base_model)
    model.save_pretrained(out, safe_serialization=True)  # (load_base_for turned its progress bars off)
    try:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    except Exception:  # a base without a tokenizer still merges; eval then needs one
        pass
    return model


def _write_finetuned(model, adapter_dir: str, base_dir: Path, out: Path) -> Path:
    """``base + adapter`` as a checkpoint at ``out``, streamed from ``base_dir``."""
    from deltakit.core.adapter import detach
    from deltakit.taskvec import TaskVector

    adapter = load_adapter(model, adapter_dir, name="deltakit-merge-input")
    try:
        tv = TaskVector.from_adapter(adapter)
    finally:
        detach(model, adapter.name)
    return tv.apply_to_checkpoint(base_dir, out)
