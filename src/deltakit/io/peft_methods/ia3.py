"""peft ``IA3`` <-> deltakit ``ia3``.

peft keys (``base_model.model.`` stripped)::

    <path>.ia3_l   (out, 1) Linear / Conv1D output scaling;  (1, in) feed-forward input scaling
                   (1, out|in, 1, 1) Conv2d

Same maths in both, ``(W x + b) * l`` or ``W (l * x) + b``; deltakit keeps ``l`` as a
vector, so tensors are flattened on import and reshaped on export. peft picks the
input-scaled targets with ``feedforward_modules`` (a regex, or suffixes matched with
``str.endswith``); the import resolves that to the exact paths, so deltakit's
``feedforward`` holds full paths.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor, nn

from ...core.adapter import Adapter
from ...methods.ia3 import IA3, IA3Config
from ._common import (PeftConverter, base_module, PeftExport, PeftImport, PeftSource, check_complete, check_paths,
                      refuse_fields, register_converter)

_UNSUPPORTED = {"target_parameters": (None, []), "layers_to_transform": (None, []),
                "exclude_modules": (None, [])}


def _is_feedforward(path: str, ff) -> bool:
    """peft's ``_check_target_module_feedforward``."""
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(k) for k in ff)


@register_converter
class IA3Converter(PeftConverter):
    peft_type = "IA3"
    methods = ("ia3",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>ia3_l)$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "IA3")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, IA3.supports, "Linear, Conv1D, Conv2d", "IA3")
        check_complete(src, IA3.supports, "IA3")
        ff = src.cfg.get("feedforward_modules")
        paths = list(src.tensors)
        config = IA3Config(targets=tuple(paths), feedforward=tuple(p for p in paths if _is_feedforward(p, ff)),
                           modules_to_save=src.full)
        state = {f"{p}.ia3_l": t["ia3_l"].reshape(-1) for p, t in src.tensors.items()}
        return PeftImport(config, state, paths)

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        tensors: dict[str, Tensor] = {}
        ff, conv1d = [], []
        for path, delta in adapter.deltas():
            base = base_module(adapter, path)
            tensors[f"{path}.ia3_l"] = _peft_shape(delta.ia3_l.detach(), base, delta.feedforward)
            conv1d.append(type(base).__name__ == "Conv1D")
            if delta.feedforward:
                ff.append(path)
        fields = {
            "peft_type": "IA3",
            "target_modules": sorted(p for p, _ in adapter.deltas()),
            "feedforward_modules": sorted(ff),
            "exclude_modules": None,
            "fan_in_fan_out": bool(conv1d) and all(conv1d),
            "init_ia3_weights": True,
        }
        return PeftExport(fields, tensors)


def _peft_shape(v: Tensor, base: nn.Module, feedforward: bool) -> Tensor:
    if isinstance(base, nn.Conv2d):
        return v.reshape(1, -1, 1, 1)
    return v.reshape(1, -1) if feedforward else v.reshape(-1, 1)
