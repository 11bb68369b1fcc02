"""``deltakit import-peft DIR -o OUT``: a Hugging Face peft adapter directory -> a deltakit adapter directory."""
from __future__ import annotations

from pathlib import Path

__all__ = ["add_parser", "run"]

# peft task_type -> the transformers auto class its base is loaded with
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", None: "AutoModel"}
HEAD_SUFFIXES = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


def add_parser(sub) -> None:
    p = sub.add_parser("import-peft", help="convert a peft adapter directory to a deltakit adapter",
                       description="Read a Hugging Face peft adapter directory (adapter_config.json + "
                                   "adapter_model.safetensors; LoRA / DoRA / PiSSA / OLoRA, LoHa, LoKr, IA3, VeRA, "
                                   "AdaLoRA, OFT, VB-LoRA, LN tuning, prompt or prefix tuning), attach it to its "
                                   "base model (the config's base_model_name_or_path, or --model) and save it as a "
                                   "deltakit adapter directory. Example: deltakit import-peft peft-sst2 -o sst2")
    p.add_argument("peft_dir", metavar="DIR", help="peft adapter directory")
    p.add_argument("-o", "--out", required=True, help="deltakit adapter directory to write (atomically)")
    p.add_argument("--model", default=None,
                   help="base model (default: the config's base_model_name_or_path); a directory, hub id or "
                        "'minilm'")
    p.add_argument("--overwrite", action="store_true", help="replace a previous deltakit adapter at OUT")
    p.set_defaults(func=run)


def _num_labels(peft_dir: Path) -> int | None:
    """Rows of the classification head saved with the adapter (modules_to_save), if any."""
    from ..io.peft import WEIGHTS
    from ..taskvec import LazyCheckpoint

    f = peft_dir / WEIGHTS
    if not f.is_file():
        return None
    ck = LazyCheckpoint(f)
    for suffix in HEAD_SUFFIXES:
        for k in ck.keys():
            if k.replace(".modules_to_save.default", "").replace(".modules_to_save", "").endswith(suffix):
                return ck.shape(k)[0]
    return None


def load_peft_base(peft_dir: Path, model: str | None):
    """The base model a peft directory names (or ``model``), as the class its task_type implies."""
    import transformers

    from ..io.files import read_json
    from ..io.models import load_pretrained
    from ..io.peft import CONFIG

    cfg = read_json(peft_dir / CONFIG)
    src = model or cfg.get("base_model_name_or_path")
    if not src:
        raise ValueError(f"{peft_dir / CONFIG} names no base_model_name_or_path; pass --model")
    task = cfg.get("task_type")
    if task not in AUTO_CLASSES:
        raise ValueError(f"{peft_dir / CONFIG}: expected task_type in {sorted(map(str, AUTO_CLASSES))}, found {task!r}")
    cls = getattr(transformers, AUTO_CLASSES[task])
    k = _num_labels(peft_dir) if task == "SEQ_CLS" else None
    base, _ = load_pretrained(cls, src, named_by="the peft config's base_model_name_or_path" if model is None else None,
                              **({"num_labels": k, "ignore_mismatched_sizes": True} if k else {}))
    return base


def run(args) -> int:
    from ..io.adapter_files import save_adapter
    from ..io.files import guard_output
    from ..io.peft import import_peft, read_peft_config

    peft_dir = Path(args.peft_dir)
    read_peft_config(peft_dir)  # one-line errors for a missing / unsupported directory before any loading
    out = guard_output(args.out, "adapter", inputs=[args.peft_dir], overwrite=args.overwrite)
    base = load_peft_base(peft_dir, args.model)
    adapter = import_peft(base, peft_dir, name=out.name or "default")
    save_adapter(adapter, out)
    r = getattr(adapter.config, "r", None)  # LoRA-family only; IA3, prompt tuning... have no rank
    print(f"imported {peft_dir} ({adapter.spec.name}{'' if r is None else f' r={r}'}, "
          f"{len(adapter.targets)} targets) to {out}")
    return 0
