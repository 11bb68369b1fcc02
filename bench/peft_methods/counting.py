"""Trainable-parameter counts and budget matching: the knob value whose real count (attach +
count, no formula) is closest to a budget in log scale."""
from __future__ import annotations

import json
import math
from pathlib import Path

from _common import write_json

from .config import ADAPTED, FULL, KNOBS, _INT, Config

__all__ = ["base_model", "settings", "head_params", "count", "match_budget", "points"]

_BASE_CACHE: dict = {}


def base_model(num_labels: int = 2):
    """The bundled MiniLM classifier (eager attention), loaded once per process."""
    from deltakit.io.models import load_classifier

    if num_labels not in _BASE_CACHE:
        _BASE_CACHE[num_labels] = load_classifier("minilm", num_labels, seed=0, attn_implementation="eager")
    return _BASE_CACHE[num_labels]


def settings(method: str, extra: dict, model) -> dict:
    from deltakit.io.models import head_modules

    return {"modules_to_save": head_modules(model), **extra}


def head_params(model) -> int:
    from deltakit.io.models import head_modules

    return sum(p.numel() for h in head_modules(model) for p in model.get_submodule(h).parameters())


def count(method: str, extra: dict) -> int:
    """Trainable parameters of ``method`` with ``extra`` settings on MiniLM, head excluded."""
    import copy

    import deltakit as dk

    base, _ = base_model()
    model = copy.deepcopy(base)
    spec = dk.get_method(method)
    ad = dk.attach(model, spec.config(**settings(method, extra, model)))
    trainable, _ = dk.param_counts(model)
    del ad
    return trainable - head_params(base)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def match_budget(method: str, target: int, cache: dict) -> dict:
    """The knob value whose trainable count is closest to ``target`` in log scale."""
    fn, lo, hi, kind = KNOBS[method]

    def c(v):
        k = repr(v)
        if k not in cache:
            try:
                cache[k] = count(method, fn(v))
            except Exception as e:  # a knob value the method refuses (e.g. OFT block sizes)
                cache[k] = None
                cache[k + ":error"] = str(e).splitlines()[0][:200]
        return cache[k]

    def err(v):
        n = c(v)
        return math.inf if not n else abs(math.log(n / target))

    if kind == "divisor":
        cands = [d for d in _divisors(hi) if d >= lo]
    elif kind == _INT:
        a, b = lo, hi  # smallest v with count(v) >= target, by bisection (counts are monotone)
        while a < b:
            m = (a + b) // 2
            n = c(m)
            if n is not None and n >= target:
                b = m
            else:
                a = m + 1
        cands = [v for v in (a - 1, a) if lo <= v <= hi]
    else:
        a, b = math.log(lo), math.log(hi)
        for _ in range(18):
            m = (a + b) / 2
            n = c(math.exp(m))
            if n is not None and n >= target:
                b = m
            else:
                a = m
        cands = [float(f"{math.exp(b):.4g}")]
    best = min(cands, key=err)
    n = c(best)
    return {"value": best, "settings": fn(best), "trainable": n,
            "reachable": n is not None and err(best) <= math.log(1.5)}


def points(cfg: Config, methods: list[str], cache_dir: Path, log) -> dict[str, list[dict]]:
    """method -> [{label, settings, trainable, reachable}] for default and each budget."""
    path = cache_dir / f"knobs-{cfg.key('select')}.json"  # counts depend on the model only
    knob_cache = json.loads(path.read_text()) if path.exists() else {}
    base, _ = base_model()
    total = sum(p.numel() for p in base.parameters())
    out: dict[str, list[dict]] = {}
    for m in methods:
        default = dict(ADAPTED.get(m, {}))
        try:
            n0 = None if m == FULL else count(m, default)
        except Exception as e:  # a method that cannot attach here is reported, not fatal
            log(f"knobs {m}: default does not attach: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out[m] = [{"label": "default", "settings": default, "trainable": None, "reachable": False,
                       "error": str(e).splitlines()[0][:300]}]
            continue
        pts = [{"label": "default", "settings": default, "trainable": n0, "reachable": True}]
        if m in KNOBS:
            mc = knob_cache.setdefault(m, {})
            for b in cfg.budgets:
                r = match_budget(m, int(round(b * total)), mc)
                pts.append({"label": f"{100 * b:g}%", **r})
        out[m] = pts
        log(f"knobs {m}: " + ", ".join(f"{p['label']}={p.get('value', '-')}"
                                        f"({p['trainable'] if p['trainable'] is not None else '?'})"
                                        for p in pts))
        write_json(path, knob_cache)
    return out
