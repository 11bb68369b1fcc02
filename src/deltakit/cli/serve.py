"""``deltakit serve BASE``: an OpenAI-compatible server for a causal LM (or an encoder) and many adapters."""
from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["add_parser", "run", "parse_adapters"]

KEY_ENV = "DELTAKIT_API_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a causal LM or an encoder and its adapters over an OpenAI-compatible HTTP API",
        description="Serve BASE ('smollm2' for the bundled SmolLM2-135M-Instruct, or a model directory) with "
                    "continuous batching: requests for different adapters share every forward. Clients use the "
                    "openai library with model=BASE's name, an adapter name or NAME@VERSION of --library. "
                    "Endpoints: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, "
                    "/v1/load_lora_adapter and /v1/unload_lora_adapter (only with --api-key; paths only inside "
                    "--adapter-dir), /health, /metrics (Prometheus). An encoder BASE ('minilm', or an encoder "
                    "directory) answers POST /v1/classify {model, input: [texts]} instead, each adapter with "
                    "its own classification head. Example: deltakit serve smollm2 "
                    "--adapter sql=runs/sql --api-key $KEY --port 8000")
    p.add_argument("base", metavar="BASE", help="'smollm2', 'minilm', or a causal LM or encoder directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve the adapter directory PATH (or a compressed task vector from 'deltakit compress') "
                        "as NAME (repeatable)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a directory /v1/load_lora_adapter may load adapters from (repeatable)")
    p.add_argument("--library", default=None, metavar="DIR", help="an adapter library: NAME or NAME@VERSION")
    p.add_argument("--served-name", default=None, help="the base model's name in requests (default: BASE as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 and enable adapter load/unload "
                        f"(default: ${KEY_ENV})")
    _limits(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is often fastest on a busy CPU)")
    p.add_argument("--dtype", default=None, help="load the base in this dtype, e.g. bfloat16 (default: as stored)")
    p.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                   help="scale out on Ray Serve: N engine replicas of BASE, each request routed to a replica "
                        "holding its adapter (model multiplexing; causal LMs only)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray-replicas: join this Ray cluster ('auto' or HEAD_IP:6379; default: a local Ray)")
    from ._common import add_strict_base
    add_strict_base(p)
    p.set_defaults(func=run)


def _limits(p) -> None:
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask (default 256)")
    p.add_argument("--max-prompt", type=int, default=2048, help="longest prompt in tokens (default 2048)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take in all (default 120)")
    p.add_argument("--resident", type=int, default=8, help="adapters attached at once (default 8)")
    p.add_argument("--host-resident", type=int, default=32,
                   help="detached adapters kept in host memory (default 32)")
    p.add_argument("--prefetch", type=int, default=4, metavar="N",
                   help="read the adapters of the next N queued requests before admission (default 4; 0: off)")


def parse_adapters(pairs: list[str]) -> dict[str, str]:
    """``["a=runs/a"]`` -> ``{"a": "runs/a"}``; each PATH must be an adapter directory."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=PATH, found {pair!r}")
        if name in out:
            raise ValueError(f"--adapter {name} is given twice")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {name}={path}: expected an adapter directory, found nothing")
        out[name] = path
    return out


def run(args) -> int:
    from ..serve.engine import Limits
    from ..serve.server import ServeOptions, build_app

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                    max_prompt=args.max_prompt, timeout=args.timeout)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: expected 0 to 65535, found {args.port}")
    opts = ServeOptions(adapters=parse_adapters(args.adapter), adapter_dirs=args.adapter_dir, library=args.library,
                        api_key=args.api_key or None, limits=limits, resident=args.resident,
                        host_resident=args.host_resident, prefetch=args.prefetch, strict_base=args.strict_base)
    for d in args.adapter_dir:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--adapter-dir {d}: expected a directory, found nothing")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected >= 1, found {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    from ..serve.classify import is_encoder
    name = args.served_name or args.base
    if args.ray_replicas is not None or args.ray_address is not None:
        return _run_on_ray(args, name, opts)
    if is_encoder(args.base):  # an encoder answers /v1/classify with each adapter's head
        from ..serve.classify import build_classify_app, load_encoder_base
        model, tok, base_head = load_encoder_base(args.base, opts.adapters)
        app = build_classify_app(model, tok, name, opts, base_head=base_head, base_path=args.base)
    else:
        model, tok = _load_base(args.base, args.dtype)
        app = build_app(model, tok, name, opts, base_path=args.base)
    import uvicorn
    print(f"deltakit serve: {name} with {len(opts.adapters)} adapter(s) on http://{args.host}:{args.port}"
          f"{'' if opts.api_key else ' (no --api-key: adapter load/unload disabled)'}", flush=True)
    # uvicorn drains on SIGTERM, then re-raises the signal it caught; a no-op handler makes that
    # re-raise harmless, so a drained shutdown exits 0 instead of dying by the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    return 0


def _run_on_ray(args, name: str, opts) -> int:
    """``--ray-replicas N``: the same engine as N Ray Serve replicas (see deltakit.serve.ray_app)."""
    from ..serve.classify import is_encoder
    if args.ray_replicas is None:
        raise ValueError("--ray-address: expected --ray-replicas N with it, found none")
    if args.ray_replicas < 1:
        raise ValueError(f"--ray-replicas: expected >= 1, found {args.ray_replicas}")
    if is_encoder(args.base):
        raise ValueError(f"--ray-replicas: expected a causal LM BASE, found the encoder {args.base!r}")
    if opts.adapter_dirs or opts.api_key:
        print("deltakit serve: note: on Ray, /v1/load_lora_adapter and /v1/unload_lora_adapter answer 501; "
              "--adapter and --library serve adapters", flush=True)
    from ..serve.ray_app import run_on_ray
    return run_on_ray(args.base, name, opts, replicas=args.ray_replicas, address=args.ray_address,
                      host=args.host, port=args.port, dtype=args.dtype, threads=args.threads)


def _load_base(base: str, dtype: str | None):
    """(model, tokenizer) of a causal LM."""
    from ..io.models import load_causal_lm
    try:
        return load_causal_lm(base, dtype)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(f"BASE {base}: expected a causal language model, found another kind "
                             f"({str(e).splitlines()[0][:120]})") from None
        raise
