"""Dtype names as files and knobs spell them (JSON can't hold a torch.dtype)."""
from __future__ import annotations

import torch

__all__ = ["dtype_name", "dtype_of", "STORE_DTYPES"]

_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64}
STORE_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"expected a float dtype name ({', '.join(_BY_NAME)}), found {name!r}") from None
