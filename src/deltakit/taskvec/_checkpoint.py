"""Lazy checkpoint access for task vectors: the reader lives in the one safetensors layer."""
from deltakit.io.tensors import DTYPES as SAFETENSORS_DTYPES
from deltakit.io.tensors import INDEX_NAME, SINGLE_NAME, LazyCheckpoint, TensorInfo, dtype_to_safetensors

__all__ = ["LazyCheckpoint", "TensorInfo", "SAFETENSORS_DTYPES", "dtype_to_safetensors", "INDEX_NAME", "SINGLE_NAME"]
