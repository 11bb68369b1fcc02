"""Serving many adapters on one base: SmolLM2 through deltakit's engine against peft and a merged model.

Issue 17, item 7. SmolLM2-135M-Instruct (fp32, CPU) with random LoRA adapters on all 7 linears
of every block, ranks cycling 32/8/64/16 (bench/serve/setup.py; saved under runs/, loaded by
the server's residency like real ones). For 1, 8, 32 and 128 distinct adapters in the traffic
(request ``i`` names adapter ``i mod N``), a bounded number of requests at a fixed concurrency
(16 in flight), each generating exactly ``--max-tokens`` tokens:

* ``deltakit``: the serving engine (continuous batching, mixed-adapter LoRA kernel), in process;
* ``http``: the same engine behind the OpenAI-compatible API on 127.0.0.1, driven by the
  ``openai`` client (one adapter count, ``--http-adapters``): the API's cost;
* ``peft``: peft's ``generate`` with ``adapter_names`` on static batches of 16, with the very
  same factor tensors (shared storage: the adapters exist once in memory);
* ``merged``: ``a0`` merged into the weights, through the engine: no adapter work, the ceiling.

Figures: generated tokens/s, p50/p99 request latency, the 1-minute load before and after each
run; the memory-traffic bound per setting, base bytes / (base bytes + the factor bytes of the
distinct adapters present in each decode step, averaged over the run's decode steps), and the
measured throughput relative to the single-adapter run over that bound (target >= 0.9 at 32).
Plus the MiniLM mixed-batch forward (bench/serve_mixed.py): its committed JSON folded in, or
rerun with ``--minilm``. Every contender runs with ``torch.set_num_threads(1)`` (a 2-core machine
shared with other jobs); contenders interleave within each round.

    python bench/bench_serve.py [--quick] [--counts 1,8,32,128] [--requests 128] [--rounds 1]
    deltakit bench serve [--quick]

Writes bench/results/serve.{json,md,png} (``--quick``: under runs/bench_serve/quick).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from _common import HERE, RESULTS, Log, load_avg, machine_info, read_json, timer, write_json, write_text
from serve.report import markdown, plot, summarize
from serve.runs import Job, StepTrace, run_engine, run_http, run_peft
from serve.setup import N_LAYERS, make_adapters, param_bytes, prompts, rank_of, traffic

RUNS = HERE.parent / "runs" / "bench_serve"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Config:
    counts: tuple[int, ...] = (1, 8, 32, 128)
    requests: int = 64
    max_tokens: int = 32
    concurrency: int = 16
    rounds: int = 1
    http_adapters: int = 32
    time_limit: float = 120.0
    threads: int = 1
    seed: int = 0
    minilm: bool = False
    quick: bool = False
    out_dir: str = str(RESULTS)
    notes: list[str] = field(default_factory=list)


QUICK = dict(counts=(1, 8), requests=8, max_tokens=6, concurrency=4, http_adapters=8, time_limit=120.0)


# ----------------------------------------------------------------------------- the three models
def _deltakit_engine(cfg: Config, paths: dict, log: Log):
    """SmolLM2 with every adapter registered and attached (device tier large enough for all)."""
    from deltakit.core.adapter import get_adapter
    from deltakit.io.models import load_causal_lm
    from deltakit.serve.engine import Engine
    from deltakit.serve.residency import Residency
    from deltakit.serve.server import context_length

    model, tok = load_causal_lm("smollm2")
    res = Residency(model, roots=[str(Path(next(iter(paths.values()))).parent)], capacity=len(paths) + 8,
                    host_capacity=0)
    for name, p in paths.items():
        res.register(name, p)
    engine = Engine(model, eos_token_ids=(), pad_token_id=tok.pad_token_id, limits=_limits(cfg), residency=res,
                    context_length=context_length(model)).start()
    keys = {n: res.resolve(n).key for n in paths}
    elapsed = timer()
    engine.call(lambda: [res.ensure(k) for k in keys.values()]).result()
    log(f"attached {len(keys)} adapters in {elapsed():.0f} s")
    factor_bytes = {keys[n]: param_bytes(get_adapter(model, keys[n]).parameters()) for n in paths}
    return model, tok, engine, res, keys, factor_bytes


def _limits(cfg: Config):
    from deltakit.serve.engine import Limits
    return Limits(max_batch=cfg.concurrency, max_queue=max(64, cfg.concurrency * 2), max_tokens=cfg.max_tokens,
                  max_prompt=256, timeout=3600.0)


def _peft_model(dk_model, keys: dict, log: Log):
    """peft over a second SmolLM2, each adapter's factors the deltakit model's own tensors."""
    import peft
    from torch import nn

    from deltakit.core.adapter import get_adapter
    from deltakit.io.models import load_causal_lm

    base, _ = load_causal_lm("smollm2")
    model, elapsed = None, timer()
    for k, name in enumerate(keys):
        r = rank_of(k)
        pc = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2.0 * r, lora_dropout=0.0,
                             target_modules=PEFT_TARGETS)
        if model is None:
            model = peft.get_peft_model(base, pc, adapter_name=name)
        else:
            model.add_adapter(name, pc)
        shared = 0
        for path, d in get_adapter(dk_model, keys[name]).deltas():
            mod = model.base_model.model.get_submodule(path)
            mod.lora_A[name].weight = nn.Parameter(d.lora_A.detach(), requires_grad=False)
            mod.lora_B[name].weight = nn.Parameter(d.lora_B.detach(), requires_grad=False)
            shared += 1
        if shared != N_LAYERS:
            raise RuntimeError(f"expected {N_LAYERS} peft LoRA layers for {name}, found {shared}")
    base.generation_config.eos_token_id = None     # every row generates max_tokens, as the engine's do
    log(f"peft model with {len(keys)} adapters (shared factors) in {elapsed():.0f} s")
    return model.eval()


def _merged_engine(cfg: Config, path: Path, pad: int):
    import deltakit as dk
    from deltakit.io.models import load_causal_lm
    from deltakit.serve.engine import Engine

    model, _ = load_causal_lm("smollm2")
    dk.load_adapter(model, path, name="a0", trainable=False)
    dk.merge_and_detach(model)
    return Engine(model, eos_token_ids=(), pad_token_id=pad, limits=_limits(cfg)).start()


# ----------------------------------------------------------------------------- the runs
def _jobs(cfg: Config, ps: list[list[int]], n: int | None) -> list[Job]:
    """``max(requests, n)`` requests, so that every one of the ``n`` adapters is asked for."""
    count = max(cfg.requests, n or 0)
    names = traffic(count, n) if n else [None] * count
    return [Job(i, ps[i], a) for i, a in enumerate(names)]


def _warmup(cfg, w) -> None:
    """A short untimed pass of every contender (first-call allocations, peft's first generate)."""
    jobs = [Job(i, w["prompts"][i], f"a{i % max(cfg.counts)}") for i in range(cfg.concurrency)]
    run_engine(w["engine"], w["res"], jobs, cfg.concurrency, 2)
    run_peft(w["peft"], jobs, cfg.concurrency, 2, w["pad"])
    run_engine(w["merged"], None, [Job(j.index, j.prompt, None) for j in jobs], cfg.concurrency, 2)


def _round(cfg: Config, w: dict, rnd: int, log: Log) -> list[dict]:
    out = []
    for n in cfg.counts:
        jobs = _jobs(cfg, w["prompts"], n)
        contenders = [("deltakit", lambda: run_engine(w["engine"], w["res"], jobs, cfg.concurrency, cfg.max_tokens,
                                                      trace=w["trace"], time_limit=cfg.time_limit)),
                      ("peft", lambda: run_peft(w["peft"], jobs, cfg.concurrency, cfg.max_tokens, w["pad"],
                                                cfg.time_limit))]
        if n == cfg.counts[len(cfg.counts) // 2]:      # the ceiling once per round, mid-round
            contenders.append(("merged", lambda: run_engine(w["merged"], None, _jobs(cfg, w["prompts"], None),
                                                            cfg.concurrency, cfg.max_tokens, name="merged",
                                                            time_limit=cfg.time_limit)))
        for name, fn in (contenders if rnd % 2 == 0 else contenders[::-1]):
            r = {"round": rnd, "adapters": n, **fn()}
            out.append(r)
            log(f"round {rnd} {n:>3} adapters {name:>8}: {r['tokens_per_s']:7.1f} tok/s, p50 {r['p50_s']:.2f} s, "
                f"p99 {r['p99_s']:.2f} s ({r['requests']} requests, {r['errors']} errors, load {r['load_1m']})")
    return out


def _http(cfg: Config, w: dict, log: Log) -> dict:
    """The API's cost: the same engine behind the app (the app's shutdown closes the engine: last)."""
    from deltakit.serve.api import create_app
    from deltakit.serve.server import LiveServer

    app = create_app(w["engine"], w["res"], w["tok"], base_name="smollm2")
    jobs = _jobs(cfg, w["prompts"], cfg.http_adapters)
    with LiveServer(app) as srv:
        r = {"round": cfg.rounds - 1, "adapters": cfg.http_adapters,
             **run_http(srv.url, jobs, cfg.concurrency, cfg.max_tokens, "smollm2", cfg.time_limit)}
    log(f"http {cfg.http_adapters} adapters: {r['tokens_per_s']:.1f} tok/s, p50 {r['p50_s']:.2f} s, "
        f"p99 {r['p99_s']:.2f} s ({r['errors']} errors, load {r['load_1m']})")
    return r


def _minilm(cfg: Config, log: Log) -> dict:
    if not cfg.minilm:
        res = read_json(RESULTS / "serve_mixed.json")
        return {"source": "bench/results/serve_mixed.json (committed; not rerun: --minilm reruns it)", **res}
    import serve_mixed
    out = None if cfg.quick else RESULTS / "serve_mixed.json"
    res = serve_mixed.run((8, 32, 128), out_path=out, log=log, **(dict(batch=8, seq=16, steps=2) if cfg.quick else {}))
    return {"source": "rerun in this run (bench/serve_mixed.py)", **res}


def build(cfg: Config, log: Log) -> dict:
    from deltakit.io.models import load_causal_lm

    torch.set_num_threads(cfg.threads)
    model, tok = load_causal_lm("smollm2")
    base_bytes = param_bytes(model.parameters())
    paths = make_adapters(model, RUNS / "adapters", max(cfg.counts), cfg.seed, log)
    del model
    dk_model, tok, engine, res, keys, factor_bytes = _deltakit_engine(cfg, paths, log)
    w = {"tok": tok, "engine": engine, "res": res, "keys": keys, "factor_bytes": factor_bytes,
         "base_bytes": base_bytes, "pad": tok.pad_token_id, "trace": StepTrace(engine),
         "prompts": prompts(tok, max(cfg.requests, *cfg.counts), cfg.seed)}
    w["peft"] = _peft_model(dk_model, keys, log)
    w["merged"] = _merged_engine(cfg, paths["a0"], tok.pad_token_id)
    return w


def run(cfg: Config, log: Log) -> dict:
    elapsed = timer()
    res = {"config": asdict(cfg), "machine": machine_info("transformers", "peft", "openai"), "load_start": load_avg()}
    w = build(cfg, log)
    _warmup(cfg, w)
    log("warm-up done")
    runs = []
    for rnd in range(cfg.rounds):
        runs += _round(cfg, w, rnd, log)
    runs.append({"contender": "http", **_http(cfg, w, log)})
    w["merged"].close()
    res.update(runs=runs, base_bytes=w["base_bytes"], adapter_bytes={k.split("~")[0]: v for k, v in
                                                                       w["factor_bytes"].items()})
    res["summary"] = summarize(res)
    res["minilm"] = _minilm(cfg, log)
    res.update(load_end=load_avg(), wall_min=round(elapsed() / 60, 1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 8 adapters, 8 requests of 6 tokens")
    p.add_argument("--counts", default=None, help="distinct adapter counts, e.g. 1,8,32,128")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default 64; at least the adapter count)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens each request generates (default 32)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1)")
    p.add_argument("--http-adapters", type=int, default=None, help="adapter count of the HTTP run (default 32)")
    p.add_argument("--minilm", action="store_true", help="rerun bench/serve_mixed.py (else fold in its JSON)")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args(argv)
    cfg = Config(**(QUICK if a.quick else {}), quick=a.quick, minilm=a.minilm)
    for k in ("requests", "max_tokens", "concurrency", "rounds", "http_adapters"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.counts:
        cfg.counts = tuple(int(c) for c in a.counts.split(","))
    if cfg.counts[0] != 1:
        raise SystemExit(f"--counts: expected the first count to be 1 (the single-adapter reference), found {cfg.counts}")
    cfg.out_dir = a.out_dir or str(RUNS / "quick" if a.quick else RESULTS)
    log = Log()
    res = run(cfg, log)
    out = Path(cfg.out_dir)
    write_json(out / "serve.json", res)
    write_text(out / "serve.md", markdown(res))
    plot(res, out / "serve.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
