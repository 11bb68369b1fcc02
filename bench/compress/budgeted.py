"""The size-budget allocation as the sweep runs it: measure a task's delta once, allocate per ratio."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from _common import timer

from .encoders import dir_bytes, _rel_error

__all__ = ["budget_for", "BUDGET_CODECS"]

# The candidates: every registered codec but DARE (random drops are dominated by top-k at any
# size) and Delta-CoMe's default 8/3/2 schedule (round-to-nearest makes it worse than svd_quant,
# see its docstring), each at the sizes that span 4x-64x; the library's default grid is wider
# (about 100 settings a tensor) and slower to measure on a 22M-parameter delta.
GRID = ([("topk", {"density": d}) for d in (0.4, 0.2, 0.1, 0.05, 0.025, 0.0125)]
        + [("compeft", {"density": d}) for d in (1.0, 0.5, 0.25, 0.1)] + [("bitdelta", {})]
        + [("svd", {"bits": b}) for b in (8.0, 4.0, 2.0, 1.0, 0.5)]
        + [("svd_quant", {"bits": b}) for b in (4.0, 2.0, 1.0, 0.5)]
        + [("quant", {"bits": b, "group_size": 128}) for b in (8, 4, 3, 2)])
BUDGET_CODECS = tuple(dict.fromkeys(n for n, _ in GRID))


def _grid():
    from deltakit.compress.budget import KEEP, Setting

    return [Setting(n, tuple(sorted(k.items()))) for n, k in GRID] + [Setting(KEEP)]


def budget_for(tv: Mapping[str, torch.Tensor]) -> Callable[[float, Path], dict]:
    """Measure every candidate on every tensor once (the slow part); the returned function
    allocates for one ratio, writes the file, decodes it and returns the sweep's figures."""
    from deltakit.compress.budget import budget_bytes, measure
    from deltakit.taskvec import TaskVector

    task_vector = TaskVector.from_mapping(dict(tv))
    elapsed = timer(None)
    measured = measure(task_vector, _grid())
    measure_s = elapsed()
    fp32 = sum(t.numel() * 4 for t in tv.values())

    def run(ratio: float, out: Path) -> dict:
        from deltakit.compress.budget import allocate, sources
        from deltakit.compress.container import load_compressed, write_compressed
        from deltakit.taskvec import as_dense

        alloc = allocate(measured, budget_bytes(fp32, ratio=ratio))
        if out.exists():
            shutil.rmtree(out)
        el = timer(None)
        write_compressed(out, sources(task_vector, alloc), max_bytes=alloc.budget)
        enc_s = el()
        cf = load_compressed(out)
        el = timer(None)
        decoded = {n: as_dense(cf.get(n), torch.float32) for n in tv}
        dec_s = el()
        counts: dict[str, int] = {}
        for c in alloc.choices.values():
            counts[c.setting.codec] = counts.get(c.setting.codec, 0) + 1
        return {"decoded": decoded, "bytes_parts": alloc.total_bytes, "bytes_file": dir_bytes(out),
                "fp32_bytes": fp32, "encode_gbps": round(fp32 / max(enc_s + measure_s, 1e-9) / 1e9, 3),
                "decode_gbps": round(fp32 / max(dec_s, 1e-9) / 1e9, 3), "rel_error": round(_rel_error(tv, decoded), 6),
                "choices": {"method": alloc.method, "codecs": counts, "measure_s": round(measure_s, 1)}}

    return run
