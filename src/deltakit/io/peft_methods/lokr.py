"""peft ``LOKR`` <-> deltakit ``lokr``.

peft keys (``base_model.model.`` stripped)::

    <path>.lokr_w1 (out_l, in_m)   or  <path>.lokr_w1_a (out_l, r), .lokr_w1_b (r, in_m)
    <path>.lokr_w2 (out_k, in_n)   or  <path>.lokr_w2_a (out_k, r), .lokr_w2_b (r, in_n[*kh*kw])

Same names and shapes as deltakit's LoKr, with two conventions that differ:

* scale: peft multiplies by ``alpha / r`` always; deltakit (as LyCORIS) by 1 when both
  factors are full. For such targets ``lokr_w1`` is multiplied by ``alpha / r`` on
  import and divided by it on export, so ``kron(w1, w2) * scale`` is the same.
* factorisation: with ``decompose_factor=f`` dividing a dimension, peft splits it as
  ``(f, dim / f)`` even when ``f`` is the larger part, where LyCORIS and deltakit put
  the smaller part first. The Kronecker product does not commute, so such a split
  cannot be converted: it is refused naming the dimension (both ways).

Not representable: ``use_effective_conv2d`` (``lokr_t2``) and non-uniform
``rank_pattern`` / ``alpha_pattern``. ``rank_dropout`` / ``module_dropout`` act in
training only (deltakit's LoKr has none) and are not carried over.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from ...core.adapter import Adapter
from ...methods._base_ops import in_out
from ...methods.lokr import LoKr, LokrConfig, factorization
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, base_module,
                      check_complete, check_paths, linear_or_conv2d_only, number, pattern_lookup, refuse_fields,
                      register_converter, uniform_rank_alpha)

_UNSUPPORTED = {"use_effective_conv2d": (False, None), "target_parameters": (None, [])}
_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def peft_factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """peft's ``lokr.layer.factorization`` (ported): no swap when ``factor`` divides ``dim``."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    length = m + n
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _check_split(where: object, path: str, base, factor: int) -> None:
    for what, dim in zip(("in", "out"), in_out(base)):
        ours, theirs = factorization(dim, factor), peft_factorization(dim, factor)
        if ours != theirs:
            raise PeftFormatError(f"{where}: {path!r}: decompose_factor={factor} splits {what}={dim} as {theirs} in "
                                  f"peft but {ours} in deltakit (LyCORIS order); a Kronecker product cannot be "
                                  "converted between the two")


def _full_gain(low_rank: bool, r: int, alpha: float) -> float:
    """peft's scale / deltakit's scale for one target (see the module doc)."""
    return 1.0 if low_rank else alpha / r


@register_converter
class LokrConverter(PeftConverter):
    peft_type = "LOKR"
    methods = ("lokr",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>lokr_(?:w[12](?:_[ab])?|t2))$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "LoKr")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, LoKr.supports, "Linear, Conv2d", "LoKr")
        check_complete(src, LoKr.supports, "LoKr")
        cfg, factor = src.cfg, int(src.cfg.get("decompose_factor", -1))
        declared = pattern_lookup(cfg.get("rank_pattern") or {})
        ranks = {}
        for path, got in src.tensors.items():
            if not set(got) <= set(_NAMES):
                raise PeftFormatError(f"{src.where}: {path!r} has {sorted(set(got) - set(_NAMES))}, which deltakit's "
                                      "LoKr does not have (use_effective_conv2d?)")
            _check_split(src.where, path, src.modules[path], factor)
            low = got.get("lokr_w2_a", got.get("lokr_w1_a"))
            ranks[path] = int(low.shape[1]) if low is not None else int(declared(path, cfg.get("r", 8)))
        r, alpha = uniform_rank_alpha(src, ranks, "LoKr")
        paths = list(src.tensors)
        config = LokrConfig(r=r, alpha=alpha, factor=factor, decompose_both=bool(cfg.get("decompose_both", False)),
                            targets=tuple(paths), modules_to_save=src.full)
        state = {}
        for p, got in src.tensors.items():
            low = "lokr_w1_a" in got or "lokr_w2_a" in got
            state.update({f"{p}.{k}": t for k, t in got.items()})
            if not low:
                state[f"{p}.lokr_w1"] = got["lokr_w1"] * _full_gain(low, r, alpha)
        return PeftImport(config, state, paths)

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: LokrConfig = adapter.config  # type: ignore[assignment]
        linear_or_conv2d_only(adapter, "LoKr")
        if config.full_matrix:
            raise PeftFormatError(f"adapter {adapter.name!r}: LoKr full_matrix=True has no peft equivalent (peft "
                                  "makes w2 low rank whenever r < max(out_k, in_n) / 2)")
        tensors: dict[str, Tensor] = {}
        for path, d in adapter.deltas():
            _check_split(f"adapter {adapter.name!r}", path, base_module(adapter, path), config.factor)
            for k in _NAMES:
                if k in d._parameters:
                    tensors[f"{path}.{k}"] = d._parameters[k].detach()
            low = d.low_rank_w1 or d.low_rank_w2
            if not low:
                tensors[f"{path}.lokr_w1"] = tensors[f"{path}.lokr_w1"] / _full_gain(low, config.r, config.alpha)
        fields = {"peft_type": "LOKR", "r": config.r, "alpha": number(config.alpha), "rank_dropout": 0.0,
                  "module_dropout": 0.0, "use_effective_conv2d": False, "decompose_both": config.decompose_both,
                  "decompose_factor": config.factor, "rank_dropout_scale": False,
                  "target_modules": sorted(p for p, _ in adapter.deltas()), "exclude_modules": None,
                  "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
                  "rank_pattern": {}, "alpha_pattern": {}}
        return PeftExport(fields, tensors)
