"""Routing overhead: generation tokens/s with routing against one plain adapter, on a fixed batch
of prompts mixed across tasks, timed in interleaved rounds (load drift hits every setting alike)."""
from __future__ import annotations

import time

from _common import interleaved, load_avg

from .config import Config
from .setup import World

__all__ = ["overhead"]


def _prompts(w: World, cfg: Config) -> list[list[int]]:
    from deltakit.train.generate import encode_prompts
    from deltakit.train.instruct import to_messages

    rows = [w.dev[t][i] for i in range(cfg.overhead_prompts) for t in w.names][: cfg.overhead_prompts]
    msgs = [to_messages(ex, "example")[:-1] for ex in rows]
    return encode_prompts(w.tok, msgs)


def overhead(w: World, cfg: Config, settings: dict, log) -> dict:
    """``settings``: label -> context-manager factory (or None) plus ``generate_ids`` keywords;
    the first is the reference (one adapter)."""
    from deltakit.train.generate import generate_ids

    ids = _prompts(w, cfg)
    n_tokens = len(ids) * cfg.overhead_new_tokens

    def timed(make, kw):
        def fn():
            t0, c0 = time.perf_counter(), time.process_time()
            with make():
                generate_ids(w.model, ids, max_new_tokens=cfg.overhead_new_tokens, batch_size=len(ids),
                             eos_token_id=(), **kw)
            return time.perf_counter() - t0, time.process_time() - c0
        return fn

    res = interleaved({k: timed(*v) for k, v in settings.items()}, steps=cfg.overhead_rounds, warmup=1)
    tps = {k: round(n_tokens / s, 2) for k, s in res["median_s"].items()}
    ref = next(iter(tps))
    out = {"prompts": len(ids), "new_tokens": cfg.overhead_new_tokens, "tokens_per_s": tps,
           "relative": {k: round(v / tps[ref], 3) for k, v in tps.items()}, "rounds": res, "load": load_avg()[0]}
    log(f"overhead: {tps}")
    return out
