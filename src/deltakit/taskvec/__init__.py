"""Task vectors: lazy ``name -> dW`` mappings of delta values, checkpoint access and streaming writes.

A delta value is a tensor or any registered :class:`DeltaValue` codec (``LowRank`` first);
checkpoint reading and writing come from the one safetensors layer, :mod:`deltakit.io.tensors`.
"""
from deltakit.io.tensors import LazyCheckpoint, PlannedTensor, TensorInfo, write_checkpoint

from ._lowrank import LowRank
from ._taskvector import TaskVector
from ._values import Delta, DeltaValue, as_dense, codec_of, codecs, get_codec, register_codec

__all__ = ["LazyCheckpoint", "TensorInfo", "LowRank", "as_dense", "TaskVector", "PlannedTensor",
           "write_checkpoint", "DeltaValue", "Delta", "register_codec", "get_codec", "codecs", "codec_of"]
