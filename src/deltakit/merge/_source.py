"""Tensor sources of the merge executor: one read interface over checkpoint files, task
vectors and in-memory state dicts, so the per-name job never asks what it reads from.

Each source answers ``keys / in / shape / dtype`` without reading data, and reads one tensor
at a time in three ways the job needs: ``read`` (as stored), ``read_into`` (into a work
buffer, straight from the file when the dtypes agree) and ``flat`` (a flat view for the
linear sum: a memory map of the file, so each byte is read once and nothing is copied).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from deltakit.taskvec import LazyCheckpoint, TaskVector, as_dense

__all__ = ["TensorSource", "CheckpointSource", "DictSource", "TaskVectorSource", "open_source", "source_dir"]

SourceLike = str | os.PathLike | LazyCheckpoint | Mapping[str, torch.Tensor]


class DictSource:
    """An in-memory state dict (``name -> tensor``, any device; read to the CPU)."""

    def __init__(self, sd: Mapping[str, torch.Tensor], label: str) -> None:
        self.sd, self.label = sd, label

    def keys(self) -> list[str]:
        return list(self.sd.keys())

    def __contains__(self, name: object) -> bool:
        return name in self.sd

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.sd[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self.sd[name].detach().to("cpu")

    def read_work(self, name: str, work: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An own copy in ``work`` dtype (the caller may write to it)."""
        return self.read(name).to(work, copy=True)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.read(name))

    def flat(self, name: str) -> torch.Tensor:
        """A flat read-only view in the stored dtype."""
        return self.read(name).reshape(-1)


class TaskVectorSource(DictSource):
    """A :class:`TaskVector`: each entry (dense or low-rank) is made dense when read."""

    def __init__(self, tv: TaskVector, label: str) -> None:
        super().__init__(tv, label)  # type: ignore[arg-type]  (keys / in / shape read the mapping)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd.shape(name))  # type: ignore[attr-defined]

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name).dtype

    def read(self, name: str) -> torch.Tensor:
        return as_dense(self.sd.get(name))  # type: ignore[union-attr]


class CheckpointSource(DictSource):
    """Checkpoint files (a :class:`LazyCheckpoint`): reads go straight from the files."""

    def __init__(self, ck: LazyCheckpoint, label: str) -> None:
        super().__init__(ck, label)  # type: ignore[arg-type]
        self.ck = ck

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ck.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.ck.dtype(name)

    def read(self, name: str) -> torch.Tensor:
        return self.ck.get(name)

    def read_work(self, name: str, work: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if self.ck.dtype(name) == work:
            return self.ck.read_into(name, torch.empty(shape, dtype=work))
        return self.read(name).to(work, copy=True)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        if self.ck.dtype(name) == out.dtype:
            self.ck.read_into(name, out)
        else:
            out.copy_(self.read(name))

    def flat(self, name: str) -> torch.Tensor:
        return self.ck.mapped(name).reshape(-1)


TensorSource = DictSource  # the interface every source implements


def open_source(src: SourceLike | TaskVector, i: int | None = None) -> TensorSource:
    """A path or LazyCheckpoint -> files; a TaskVector -> its entries; a mapping -> a state dict.
    ``i`` (the position among the models) names an in-memory source in errors."""
    if isinstance(src, (str, os.PathLike)):
        return CheckpointSource(LazyCheckpoint(src), str(src))
    if isinstance(src, LazyCheckpoint):
        return CheckpointSource(src, str(src.path))
    where = "base" if i is None else f"models[{i}]"
    if isinstance(src, TaskVector):
        return TaskVectorSource(src, where)
    return DictSource(src, where)


def source_dir(src: SourceLike) -> Path | None:
    """The checkpoint directory behind ``src`` (for config.json and the files copied beside the
    output), or None for an in-memory source."""
    if isinstance(src, LazyCheckpoint):
        src = src.path
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        return Path(src)
    return None
