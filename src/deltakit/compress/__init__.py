"""Delta compression: codecs that are delta values, so apply, merge and export read them.

Every codec is one file in :mod:`deltakit.compress.codecs`: a :class:`CompressedValue`
subclass registered as a task-vector codec (how it is stored and decoded) and an encoder
registered with :func:`register_compressor` (how a dense ``dW`` becomes one, with its knobs).
"""
from ._bits import pack, pack_signs, packed_bytes, unpack, unpack_signs
from ._registry import (CompressConfigError, CompressedValue, Compressor, build_compressor_config,
                        compress_tensor, get_compressor, list_compressors, register_compressor)

__all__ = ["pack", "unpack", "packed_bytes", "pack_signs", "unpack_signs", "CompressedValue", "Compressor",
           "register_compressor", "get_compressor", "list_compressors", "build_compressor_config",
           "compress_tensor", "CompressConfigError"]
