"""``deltakit generate ADAPTER_OR_MODEL --prompt TEXT``: continue prompts with a causal LM, through an adapter."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_parser", "run", "read_prompts"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text with a causal LM, through an adapter",
        description="Continue each prompt with a causal language model: an adapter directory on the base its "
                    "manifest records (or --model), or a model ('smollm2' for the bundled SmolLM2-135M-Instruct, "
                    "a directory, a hub id). Greedy by default; --sample draws with --temperature / --top-p, "
                    "reproducibly for one --seed. Prompts go through the tokenizer's chat template as one user "
                    "turn (--no-chat: raw text). Prints each output (--json: one JSON object per prompt).")
    p.add_argument("model_or_adapter", metavar="ADAPTER_OR_MODEL",
                   help="an adapter directory, or a causal LM: 'smollm2', a directory or a hub id")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--file", default=None, metavar="PROMPTS.jsonl",
                   help="more prompts, one JSON object a line: {\"prompt\": text} or {\"messages\": [...]} "
                        "(a conversation awaiting the assistant's reply)")
    p.add_argument("--model", default=None, help="base model for an adapter (default: the one its manifest records)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all tokens)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="feed prompts as raw text, no chat template")
    p.add_argument("--json", action="store_true", help="print {\"prompt\", \"output\"} per line")
    from ._common import add_strict_base
    add_strict_base(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.generate import generate

    prompts = list(args.prompt) + (read_prompts(args.file) if args.file else [])
    if not prompts:
        raise ValueError("expected at least one --prompt or a --file of prompts, found none")
    if not args.chat and any(not isinstance(p, str) for p in prompts):
        raise ValueError("--no-chat expects text prompts, found a {\"messages\": ...} conversation in --file")
    model, tok = load_generator(args.model_or_adapter, args.model, args.strict_base)
    outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat,
                    batch_size=args.batch_size)
    for p, o in zip(prompts, outs):
        print(json.dumps({"prompt": p, "output": o}) if args.json else o)
    return 0


def read_prompts(path: str) -> list:
    """Prompts of a JSONL file: text (``prompt``) or conversations (``messages``); one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--file {path}: expected a JSONL file, found nothing")
    from ..train.data import json_lines

    out: list = []
    for n, obj in json_lines(p):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            out.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            out.append(obj["messages"])
        else:
            raise ValueError(f"{p} line {n}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}, "
                             f"found {json.dumps(obj)[:60]}")
    if not out:
        raise ValueError(f"{p}: expected at least one prompt, found an empty file")
    return out


def load_generator(model_or_adapter: str, model: str | None, strict_base: bool = True):
    """(causal LM, left-padding tokenizer): an adapter on its recorded base, or a model."""
    from ..io.adapter_files import MANIFEST, load_adapter, read_manifest
    from ..io.models import load_base_for, load_causal_lm

    if not (Path(model_or_adapter) / MANIFEST).is_file():
        if model is not None:
            raise ValueError(f"--model applies to an adapter directory; {model_or_adapter} is a model")
        return load_causal_lm(model_or_adapter)
    man = read_manifest(model_or_adapter)
    cls = (man.get("base_model") or {}).get("class") or "?"
    if not cls.endswith("ForCausalLM"):
        raise ValueError(f"expected an adapter on a causal LM (*ForCausalLM), found one on {cls}")
    base, path = load_base_for(man, model)
    load_adapter(base, model_or_adapter, strict_base=strict_base)
    return base.eval(), _tokenizer(path, base)


def _tokenizer(path: str, model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
