"""Lazy, tensor-at-a-time access to Hugging Face style safetensors checkpoints.

A checkpoint is a directory holding ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files plus ``model.safetensors.index.json``,
or a single ``.safetensors`` file. Only the JSON headers are read up front; each
:meth:`LazyCheckpoint.get` reads exactly one tensor's bytes with ``readinto`` into
a fresh tensor, so resident memory is one tensor, not the file (a memory map
would leave every touched page counted in the process's RSS).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.io.files import DeltakitFileError, read_json

__all__ = ["LazyCheckpoint", "TensorInfo", "SAFETENSORS_DTYPES", "dtype_to_safetensors"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    try:
        return _TO_ST[dtype]
    except KeyError:
        raise DeltakitFileError(f"expected a dtype safetensors can store, found {dtype}") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range (after the header)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header without touching tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise DeltakitFileError(f"{path}: expected a safetensors header, found {len(raw)} bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise DeltakitFileError(f"{path}: expected header length <= file size, found {n}")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltakitFileError(f"{path} is not a readable safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[h["dtype"]]
            begin, end = h["data_offsets"]
            shape = tuple(int(s) for s in h["shape"])
        except (KeyError, TypeError, ValueError):
            raise DeltakitFileError(f"{path}: tensor {name!r} has a malformed header entry {h}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or 8 + n + end > size:
            raise DeltakitFileError(
                f"{path}: tensor {name!r} expected {numel * dtype.itemsize} bytes inside the file, "
                f"found offsets {begin}..{end} (file is {size} bytes; truncated?)")
        infos[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin)
    return infos, meta


class LazyCheckpoint:
    """Read-only view of a safetensors checkpoint; tensors load one at a time.

    >>> ckpt = LazyCheckpoint("path/to/model_dir")   # doctest: +SKIP
    >>> ckpt.shape("lm_head.weight"), ckpt.dtype("lm_head.weight")   # no data read
    >>> w = ckpt.get("lm_head.weight")                # (vocab, hidden), one read
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self._files():
            infos, meta = read_header(file)
            dup = self._infos.keys() & infos.keys()
            if dup:
                raise DeltakitFileError(f"{file}: tensor {sorted(dup)[0]!r} appears in two shards")
            self._infos.update(infos)
            self.metadata.update(meta)

    def _files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise DeltakitFileError(f"expected a checkpoint directory or .safetensors file at {p}, found nothing")
        if (p / INDEX_NAME).is_file():
            index = read_json(p / INDEX_NAME)
            wm = index.get("weight_map")
            if not isinstance(wm, dict):
                raise DeltakitFileError(f"{p / INDEX_NAME}: expected a 'weight_map' object, found {type(wm).__name__}")
            files = sorted(set(wm.values()))
            missing = [f for f in files if not (p / f).is_file()]
            if missing:
                raise DeltakitFileError(f"{p / INDEX_NAME}: expected shard {missing[0]} to exist, found nothing")
            return [p / f for f in files]
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        found = sorted(x.name for x in p.iterdir())[:5]
        raise DeltakitFileError(f"{p}: expected {SINGLE_NAME} or {INDEX_NAME}, found {found}")

    # -- mapping-like API ---------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: expected a tensor named {name!r}, found none") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor, safe to modify)."""
        info = self.info(name)
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(name, out)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor's bytes straight into ``out`` (contiguous CPU, same dtype and numel)."""
        info = self.info(name)
        if out.dtype != info.dtype or out.numel() * out.element_size() != info.nbytes or not out.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {info.dtype} buffer of {info.nbytes} bytes, "
                             f"found {out.dtype} {tuple(out.shape)}")
        if info.nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.start)
                got = 0
                while got < info.nbytes:
                    r = f.readinto(view[got:])
                    if not r:
                        raise DeltakitFileError(f"{info.file}: expected {info.nbytes} bytes for {name!r}, found {got}")
                    got += r
        return out

    def mapped(self, name: str) -> torch.Tensor:
        """One tensor as a zero-copy view over a private memory map of its bytes.

        For data read once and consumed (summed into an accumulator, say): no copy into a
        buffer, so a streaming sum reads each byte once instead of three times. The map lives
        as long as the returned tensor, so drop it to release the pages; writes to it stay in
        this process (copy-on-write), never reach the file. Truncating the file while a view
        is alive is undefined, as for any memory map.
        """
        info = self.info(name)
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        lead = info.start % mmap.ALLOCATIONGRANULARITY
        with open(info.file, "rb") as f:
            if os.fstat(f.fileno()).st_size < info.start + info.nbytes:
                raise DeltakitFileError(f"{info.file}: expected {info.nbytes} bytes for {name!r} at offset "
                                        f"{info.start}, found a shorter file")
            mm = mmap.mmap(f.fileno(), lead + info.nbytes, offset=info.start - lead, access=mmap.ACCESS_COPY)
        n = info.nbytes // info.dtype.itemsize
        return torch.frombuffer(mm, dtype=info.dtype, count=n, offset=lead).view(info.shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, {len(self)} tensors)"
