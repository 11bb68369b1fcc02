"""peft ``LOHA`` <-> deltakit ``loha``.

peft keys (``base_model.model.`` stripped)::

    <path>.hada_w1_a  (out, r)    <path>.hada_w1_b  (r, in[*kh*kw])
    <path>.hada_w2_a  (out, r)    <path>.hada_w2_b  (r, in[*kh*kw])

Same names, shapes and scale ``alpha / r`` as deltakit's LoHa, so tensors copy
unchanged. Non-uniform ``rank_pattern`` / ``alpha_pattern`` import exactly as for
LoRA: each product is zero-padded to the largest rank (padded parts get zero
gradients) and ``hada_w1_a`` carries the ratio of the target's scale to the adapter's.
Not representable: ``use_effective_conv2d`` (the CP form with ``hada_t1`` / ``hada_t2``). peft's
``rank_dropout`` / ``module_dropout`` act in training only and deltakit's LoHa has no
such regularisers, so they are not carried over (outputs are unaffected).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...core.adapter import Adapter
from ...methods.loha import LoHa, LohaConfig
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, linear_or_conv2d_only, number, per_target_scales, refuse_fields,
                      register_converter)

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_UNSUPPORTED = {"use_effective_conv2d": (False, None), "target_parameters": (None, [])}


@register_converter
class LohaConverter(PeftConverter):
    peft_type = "LOHA"
    methods = ("loha",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>hada_(?:w[12]_[ab]|t[12]))$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "LoHa")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, LoHa.supports, "Linear, Conv2d", "LoHa")
        check_complete(src, LoHa.supports, "LoHa")
        for path, got in src.tensors.items():
            if set(got) != set(_NAMES):
                raise PeftFormatError(f"{src.where}: {path!r} has {sorted(got)}, expected {list(_NAMES)}")
        ranks = {p: int(t["hada_w1_a"].shape[1]) for p, t in src.tensors.items()}
        r, alpha, gains = per_target_scales(src.cfg, ranks, "alpha", False, src.where)
        paths = list(src.tensors)
        config = LohaConfig(r=r, alpha=alpha, targets=tuple(paths), modules_to_save=src.full)
        state = {}
        for p, got in src.tensors.items():
            for i in ("1", "2"):
                a, b = got[f"hada_w{i}_a"], got[f"hada_w{i}_b"]            # (out, k), (k, cols)
                if i == "1" and gains[p] != 1.0:
                    a = a * gains[p]
                k = a.shape[1]
                state[f"{p}.hada_w{i}_a"] = torch.cat([a, a.new_zeros(a.shape[0], r - k)], dim=1)
                state[f"{p}.hada_w{i}_b"] = torch.cat([b, b.new_zeros(r - k, b.shape[1])])
        return PeftImport(config, state, paths)

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: LohaConfig = adapter.config  # type: ignore[assignment]
        linear_or_conv2d_only(adapter, "LoHa")
        tensors = {f"{p}.{k}": getattr(d, k).detach() for p, d in adapter.deltas() for k in _NAMES}
        fields = {"peft_type": "LOHA", "r": config.r, "alpha": number(config.alpha), "rank_dropout": 0.0,
                  "module_dropout": 0.0, "use_effective_conv2d": False,
                  "target_modules": sorted(p for p, _ in adapter.deltas()), "exclude_modules": None,
                  "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
                  "rank_pattern": {}, "alpha_pattern": {}}
        return PeftExport(fields, tensors)
