"""``deltakit route --library DIR --router NAME --prompt TEXT``: run prompts through a router over
a library's adapters and show which adapters each prompt (or token) used."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_parser", "run"]

ROUTERS = ("arrow", "mbc", "poly", "mhr", "lorahub", "retrieval")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "route", help="run prompts through a router over a library's adapters; show which adapters each used",
        description="Route each prompt among the adapters of a library and show the choice: per prompt the "
                    "adapters with their mean weight (over tokens and layers where the router decides per "
                    "token; --per-token: each prompt token's top adapter too), then the model's answer (generated "
                    "text for a causal LM, the predicted class for a classifier). Routers: arrow (per token and "
                    "layer, by the library's prototypes), mbc (Arrow among the library's MBC cluster adapters: "
                    "'deltakit library cluster' makes them), poly / mhr (a routing saved by "
                    "deltakit.route.poly, for one --task), lorahub (weights fitted on --examples), retrieval "
                    "(by similarity to each adapter's description, among the --group(s) the caller holds).")
    p.add_argument("--library", required=True, metavar="DIR", help="the adapter library")
    p.add_argument("--router", required=True, choices=ROUTERS, help="which router")
    p.add_argument("--adapter", action="append", default=[], metavar="REF",
                   help="route among these entries (repeatable; default: the newest version of every name)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--file", default=None, metavar="PROMPTS.jsonl",
                   help="more prompts, one JSON object a line: {\"prompt\": text} or {\"messages\": [...]}")
    p.add_argument("--model", default=None, help="base model (default: the one the library's entries record)")
    p.add_argument("--top-k", type=int, default=1, help="adapters per token (arrow, mbc) or prompt (retrieval); default 1")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature over the top-k (default 1.0)")
    p.add_argument("--group", action="append", default=[], metavar="GROUP",
                   help="retrieval: an access group the caller holds (repeatable; none: public adapters only)")
    p.add_argument("--routing", default=None, metavar="FILE", help="poly / mhr: the saved routing (safetensors)")
    p.add_argument("--task", default=None, help="poly / mhr: the task whose routing to use")
    p.add_argument("--examples", default=None, metavar="EXAMPLES.jsonl",
                   help="lorahub: a few instruction examples of the new task ({\"messages\": [...]} per line)")
    p.add_argument("--iterations", type=int, default=40, help="lorahub: CMA-ES iterations (default 40)")
    p.add_argument("--mix", action="store_true",
                   help="lorahub: mix the adapters' outputs (any ranks) instead of composing their factors "
                        "(the paper's way: one rank, scale and targets)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--per-token", action="store_true", help="also show each prompt token's top adapter")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=run)


def run(args) -> int:
    from .generate import read_prompts

    prompts = list(args.prompt) + (read_prompts(args.file) if args.file else [])
    if not prompts:
        raise ValueError("expected at least one --prompt or a --file of prompts, found none")
    if args.top_k < 1:
        raise ValueError(f"--top-k: expected >= 1, found {args.top_k}")
    lib, refs = _library(args)
    model, tok, causal = _base(lib, refs, args.model)
    router = _router(args, lib, refs, model, tok)
    for i, p in enumerate(prompts):
        row = _route_one(router, args, model, tok, p, causal)
        print(json.dumps({"prompt": p, **row}) if args.json else _text(i, row, args.per_token))
    return 0


def _library(args):
    from ..library import AdapterLibrary

    if not (Path(args.library) / "library.sqlite").is_file():
        raise FileNotFoundError(f"--library {args.library}: expected a library (library.sqlite), found nothing")
    lib = AdapterLibrary(args.library)
    refs = list(args.adapter) or _newest(lib)
    if not refs:
        raise ValueError(f"--library {args.library}: expected adapters to route among, found an empty library")
    for r in refs:
        lib.get(r)  # a one-line error for an unknown ref
    return lib, refs


def _newest(lib) -> list[str]:
    newest: dict[str, object] = {}
    for e in lib.list():
        if e.name not in newest or e.version > newest[e.name].version:
            newest[e.name] = e
    return [e.ref for e in newest.values()]


def _base(lib, refs, model_src):
    """(model, tokenizer, is_causal) the library's entries were trained on (or --model)."""
    from ..io.models import load_base_for
    from .generate import _tokenizer

    man = lib.get(refs[0]).manifest
    model, path = load_base_for(man, model_src)
    return model.eval(), _tokenizer(path, model), type(model).__name__.endswith("ForCausalLM")


def _router(args, lib, refs, model, tok):
    from ..route import get_router

    cls = get_router(args.router)
    if args.router == "arrow":
        return cls.from_library(lib, refs, model, top_k=args.top_k, temperature=args.temperature)
    if args.router == "retrieval":
        return cls.from_library(lib, refs, model, groups=args.group, tokenizer=tok, top_k=args.top_k,
                                temperature=args.temperature if args.top_k > 1 else None)
    if args.router in ("poly", "mhr"):
        return _poly(args, cls, lib, refs, model)
    return _ROUTER_BUILDERS[args.router](args, cls, lib, refs, model, tok)


def _poly(args, cls, lib, refs, model):
    if not args.routing or not args.task:
        raise ValueError(f"--router {args.router}: expected --routing FILE and --task NAME, found "
                         f"{'no --routing' if not args.routing else 'no --task'}")
    router = cls.from_file(args.routing)
    if type(router) is not cls:
        raise ValueError(f"--routing {args.routing}: expected a {args.router} routing, found {type(router).__name__}")
    if args.task not in router.tasks:
        raise ValueError(f"--task: expected one of {list(router.tasks)}, found {args.task!r}")
    attached = _attached(model)
    for n in router.names:
        if n not in attached:
            lib.load(model, n, name=n, activate=False, trainable=False)
    return router


def _mbc(args, cls, lib, refs, model, tok):
    """Arrow among the library's MBC cluster adapters (--adapter: these cluster entries)."""
    return cls.from_library(lib, model, list(args.adapter) or None, top_k=args.top_k, temperature=args.temperature)


def _lorahub(args, cls, lib, refs, model, tok):
    """Weights over ``refs`` fitted on --examples (the new task's few instruction rows), composed."""
    from ..train.data import json_lines
    from ..train.instruct import InstructionDataset

    if not args.examples:
        raise ValueError("--router lorahub: expected --examples EXAMPLES.jsonl (a few rows of the new task), found none")
    rows = [v for _, v in json_lines(args.examples)]
    if not rows:
        raise ValueError(f"--examples {args.examples}: expected instruction rows, found none")
    attached = _attached(model)
    names = []
    for r in refs:
        e = lib.get(r)
        if e.name not in attached:
            lib.load(model, e.ref, name=e.name, activate=False, trainable=False)
        names.append(e.name)
    ds = InstructionDataset(rows, tok, max_length=512)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    router = cls.fit(model, names, [batch], iterations=args.iterations, mode="mix" if args.mix else "compose")
    import sys
    print(router.describe(), file=sys.stderr)
    return router


_ROUTER_BUILDERS = {"mbc": _mbc, "lorahub": _lorahub}


def _attached(model) -> set[str]:
    from ..core.adapter import adapters
    return set(adapters(model))


def _batch(router, args, tok, prompt, causal):
    import torch

    from ..train.generate import encode_prompts

    if causal:
        ids = torch.tensor([encode_prompts(tok, [prompt])[0]])
    else:
        ids = tok([prompt if isinstance(prompt, str) else json.dumps(prompt)], return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "texts": [prompt if isinstance(prompt, str) else _user_text(prompt)]}
    if args.router in ("poly", "mhr"):
        batch["task_ids"] = [args.task]
    return batch


def _user_text(messages) -> str:
    return "\n".join(m.get("content", "") for m in messages if m.get("role") == "user")


def _route_one(router, args, model, tok, prompt, causal) -> dict:
    """One prompt: a forward to record the routing, then the answer under the same routing."""
    import torch

    batch = _batch(router, args, tok, prompt, causal)
    fwd = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad(), router.scope(model, batch):
        logits = model(**fwd).logits
    decision = router.decisions[0] if router.decisions else None   # recorded when the scope closes
    if causal:
        from ..train.generate import generate
        with router.scope(model, batch):
            answer = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens, batch_size=1)[0]
    else:
        answer = int(logits[0].argmax(-1))
    row = {"weights": decision.weights if decision else {}, "answer": answer}
    if args.per_token and decision is not None and decision.tokens:
        toks = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
        row["tokens"] = list(zip(toks, decision.tokens))
    return row


def _text(i: int, row: dict, per_token: bool) -> str:
    used = ", ".join(f"{n} {w:.2f}" for n, w in row["weights"].items()) or "(base: no adapter)"
    lines = [f"[{i}] adapters: {used}", f"    answer: {row['answer']}"]
    if per_token and row.get("tokens"):
        runs: list[list] = []
        for t, a in row["tokens"]:
            if runs and runs[-1][1] == a:
                runs[-1][0] += t
            else:
                runs.append([t, a])
        lines.append("    tokens: " + " | ".join(f"{t!r}->{a}" for t, a in runs))
    return "\n".join(lines)
