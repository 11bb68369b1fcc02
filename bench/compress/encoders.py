"""Part (a) and (c): MiniLM full fine-tuning deltas, compressed by every codec at every ratio.

Each task's delta is compressed tensor by tensor (never all dense at once beyond the task's own
fp32 delta, which the fine-tune cache holds anyway), saved as a task-vector file (the bytes
on disk are the figure), decoded, and scored on dev with the task's own head. Part (c)
merges the four compressed files with task arithmetic straight from disk (the merge engine
decodes one tensor at a time) and scores every task with the merged encoder.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from _common import timer

from .rate import settings_for

__all__ = ["Scorer", "compress_delta", "memcpy_gbps", "dir_bytes"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def memcpy_gbps(mb: int = 256, repeats: int = 5) -> float:
    """This machine's copy bandwidth (GB/s of data copied), the yardstick for codec speeds."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return round(src.nbytes / best / 1e9, 2)


def _timed(fn) -> float:
    elapsed = timer(None)
    fn()
    return elapsed()


class Scorer:
    """One classifier per label count; loads base + dW + head and scores a task's dev split."""

    def __init__(self, model_name: str, base_state: Mapping[str, torch.Tensor], seed: int = 0):
        self.name, self.base, self.seed, self.models = model_name, base_state, seed, {}

    def _model(self, k: int):
        from deltakit.io.models import load_classifier

        if k not in self.models:
            self.models[k] = load_classifier(self.name, k, seed=self.seed)[0].eval()
        return self.models[k]

    @torch.no_grad()
    def score(self, td, dw: Mapping[str, torch.Tensor] | None, head: Mapping[str, torch.Tensor]) -> float:
        from deltakit.taskvec import TaskVector
        from deltakit.train import evaluate

        model = self._model(td.labels)
        state = TaskVector.from_mapping(dict(dw)).apply(self.base) if dw else dict(self.base)
        state.update(head)
        model.load_state_dict(state, strict=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return round(evaluate(model, td.loaders["dev"], td.metric)[td.metric], 5)


def compress_delta(tv: Mapping[str, torch.Tensor], codec: str, knobs: dict, out: Path) -> dict:
    """Compress every tensor of ``tv`` with ``codec`` (``knobs``), write the compressed file
    (``deltakit.compress`` container) to ``out``, load it back and decode; returns bytes (parts
    and on disk), encode / decode speeds (in memory, fp32 GB/s) and the decoded delta."""
    from deltakit.compress import build_compressor_config, compress_tensor
    from deltakit.compress.budget import stored_bytes
    from deltakit.compress.container import Source, load_compressed, write_compressed
    from deltakit.taskvec import as_dense

    cfg = build_compressor_config(codec, knobs)
    values, enc_s = {}, 0.0
    for n, dw in tv.items():
        elapsed = timer(None)
        values[n] = compress_tensor(dw, codec, cfg)
        enc_s += elapsed()
    if out.exists():
        shutil.rmtree(out)
    write_compressed(out, {n: Source(v, codec, knobs) for n, v in values.items()})
    loaded = load_compressed(out)
    decoded, dec_s = {}, 0.0
    for n in tv:
        v = loaded.get(n)
        elapsed = timer(None)
        decoded[n] = as_dense(v, torch.float32)
        dec_s += elapsed()
    fp32 = sum(t.numel() * 4 for t in tv.values())
    return {"decoded": decoded, "bytes_parts": sum(stored_bytes(v) for v in values.values()),
            "bytes_file": dir_bytes(out), "fp32_bytes": fp32,
            "encode_gbps": round(fp32 / max(enc_s, 1e-9) / 1e9, 3),
            "decode_gbps": round(fp32 / max(dec_s, 1e-9) / 1e9, 3),
            "rel_error": round(_rel_error(tv, decoded), 6)}


def _rel_error(tv: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> float:
    num = sum(float((tv[n].double() - decoded[n].double()).pow(2).sum()) for n in tv)
    den = sum(float(tv[n].double().pow(2).sum()) for n in tv)
    return (num / den) ** 0.5 if den > 0 else 0.0


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="dk_compress_bench_"))


def plan(codec: str, ratio: float, tv: Mapping[str, torch.Tensor]) -> dict | None:
    return settings_for(codec, ratio, [tuple(t.shape) for t in tv.values()])
