"""Which knobs make a codec hit a compression ratio on a given delta (planned from bit counts).

Each codec has one *rate knob*: continuous ones (top-k density, SVD rank, ...) are solved by
bisection so the planned total bits meet ``32 / ratio`` bits per parameter; discrete ones
(quantisation widths) take the setting whose planned ratio is nearest. Planning uses the
compressor's own ``bits(cfg, shape)``, and the benchmark then reports the bytes actually stored,
so a plan that is off shows up as an off ratio in the table, never as a silent correction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["RATE_KNOBS", "settings_for", "planned_ratio"]

# codec -> ("continuous", low, high, log, integer, knobs(v)) with the size growing in v, or
# ("discrete", [settings...]); codecs not listed run once at their defaults (BitDelta: ~1 bit)
RATE_KNOBS: dict[str, tuple] = {
    "topk": ("continuous", 1e-4, 1.0, True, False, lambda v: {"density": v}),
    "dare": ("continuous", 1e-4, 1.0, True, False, lambda v: {"p": 1.0 - v}),
    "compeft": ("continuous", 1e-4, 1.0, True, False, lambda v: {"density": v}),
    "svd": ("continuous", 0.01, 32.0, True, False, lambda v: {"bits": v}),
    "svd_quant": ("continuous", 0.01, 16.0, True, False, lambda v: {"bits": v}),
    "deltacome": ("continuous", 0.01, 8.0, True, False, lambda v: {"bits": v}),
    "quant": ("discrete", [{"bits": b, "group_size": g} for b in (8, 4, 3, 2) for g in (32, 64, 128, 256)]),
}


_SLACK = 1.3  # a setting more than 30% off the target ratio is another ratio's row, not this one's


def planned_ratio(name: str, knobs: dict, shapes: Sequence[tuple[int, ...]]) -> float | None:
    """fp32 bits / planned bits over ``shapes`` (None when the codec cannot plan without encoding)."""
    from deltakit.compress import build_compressor_config, get_compressor

    comp = get_compressor(name)
    if comp.bits is None:
        return None
    cfg = build_compressor_config(name, knobs)
    total = sum(math.prod(s) for s in shapes)
    planned = sum(comp.bits(cfg, tuple(s)) * math.prod(s) for s in shapes)
    return 32.0 * total / planned if planned > 0 else math.inf


def _bisect(name: str, knobs, lo: float, hi: float, log: bool, integer: bool, ratio: float,
            shapes) -> dict | None:
    """Knobs whose planned ratio is closest to ``ratio`` from above (the ratio falls as v grows)."""
    val = (lambda v: knobs(round(v) if integer else float(f"{v:.6g}")))
    f = (lambda v: planned_ratio(name, val(v), shapes))
    if f(hi) is None or f(lo) < ratio or f(hi) > ratio * _SLACK:
        return None  # cannot get that small, or cannot spend that many bytes
    if f(hi) > ratio:
        return val(hi)
    a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
    for _ in range(40):
        m = (a + b) / 2
        v = math.exp(m) if log else m
        a, b = (m, b) if f(v) > ratio else (a, m)
    return val(math.exp(a) if log else a)


def settings_for(name: str, ratio: float, shapes: Sequence[tuple[int, ...]]) -> dict | None:
    """Knobs hitting ``ratio`` on ``shapes`` as planned, or None when the codec cannot reach it."""
    spec = RATE_KNOBS.get(name)
    if spec is None:
        return {}
    if spec[0] == "discrete":
        scored = [(abs(math.log(r / ratio)), s) for s in spec[1]
                  if (r := planned_ratio(name, s, shapes)) is not None and 1 / _SLACK <= r / ratio <= _SLACK]
        return min(scored, key=lambda x: x[0])[1] if scored else None
    _, lo, hi, log, integer, knobs = spec
    return _bisect(name, knobs, lo, hi, log, integer, ratio, shapes)
