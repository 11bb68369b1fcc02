"""peft ``LN_TUNING`` <-> deltakit ``ln_tuning``.

peft keys::

    base_model.model.<path>.ln_tuning_layers.weight   (dim,)   the trained copy's values
    base_model.model.<path>.ln_tuning_layers.bias     (dim,)

peft saves the trained norm's full values; deltakit stores the difference from the
base (``ln_delta``), so import subtracts the model's own weight / bias and export adds
them back (exact up to one float rounding).
"""
from __future__ import annotations

import re

from ...core.adapter import Adapter
from ...methods.ln_tuning import LNTuning, LNTuningConfig
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, base_module,
                      check_complete, check_paths, register_converter)


@register_converter
class LnTuningConverter(PeftConverter):
    peft_type = "LN_TUNING"
    methods = ("ln_tuning",)
    key = re.compile(r"^(?P<path>.+)\.ln_tuning_layers\.(?P<param>weight|bias)$")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, LNTuning.supports, "LayerNorm and RMSNorm-style modules", "LN tuning")
        check_complete(src, LNTuning.supports, "LN tuning")
        state = {}
        for path, got in src.tensors.items():
            base = src.modules[path]
            have = {k for k in ("weight", "bias") if getattr(base, k, None) is not None}
            if set(got) != have:
                raise PeftFormatError(f"{src.where}: {path!r} has {sorted(got)}, the model's norm has {sorted(have)}")
            for k, t in got.items():
                state[f"{path}.ln_delta.{k}"] = t - getattr(base, k).detach().to(t.dtype)
        config = LNTuningConfig(targets=tuple(src.tensors), modules_to_save=src.full)
        return PeftImport(config, state, list(src.tensors))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        tensors = {}
        for path, d in adapter.deltas():
            base = base_module(adapter, path)
            for k in d.names:
                tensors[f"{path}.ln_tuning_layers.{k}"] = (getattr(base, k).detach() + d.ln_delta[k].detach()
                                                           .to(getattr(base, k).dtype))
        fields = {"peft_type": "LN_TUNING", "target_modules": sorted(p for p, _ in adapter.deltas()),
                  "exclude_modules": None}
        return PeftExport(fields, tensors)
