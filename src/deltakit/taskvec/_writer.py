"""Streaming checkpoint writes for task vectors: the writer lives in the one safetensors layer.

Kept as a module because ``deltakit.merge.executor`` imports ``DEFAULT_SHARD_BYTES`` from here
and ``tests/merge/test_recipe_executor.py`` patches ``os.fsync`` through ``_writer.os``; both
can import from :mod:`deltakit.io.tensors` instead, after which this module can go.
"""
import os  # noqa: F401  (see the docstring)

from deltakit.io.tensors import DEFAULT_SHARD_BYTES, PlannedTensor, write_checkpoint

__all__ = ["PlannedTensor", "write_checkpoint", "DEFAULT_SHARD_BYTES"]
