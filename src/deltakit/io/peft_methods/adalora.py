"""peft ``ADALORA`` <-> deltakit ``adalora``.

peft keys::

    base_model.model.<path>.lora_A  (r_p, in)   lora_E  (r_p, 1)   lora_B  (out, r_p)

peft's scale is ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``, also after
the saved ``rank_pattern`` (one bool per initial component, per target) has resized a
target to its kept components ``r_p`` (peft keeps the old ``ranknum`` when resizing).
deltakit keeps every target at ``init_r`` with a state buffer (ON / OFF per component)
and scale ``alpha / init_r``. So on import each target is zero-padded to ``init_r``
with the padded components OFF, and ``lora_E`` is multiplied by the ratio of the two
scales; export writes the ON components only, with the matching ``rank_pattern``.
peft insists on ``total_step``; a deltakit config without one (the training loop's
length was used) is exported with the smallest schedule peft accepts,
``tinit + tfinal + 1``, which only matters if the adapter is trained further in peft.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ...core.adapter import Adapter
from ...methods._lora_common import OFF, ON
from ...methods.adalora import AdaLoRA, AdaLoraConfig
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, number, refuse_fields, register_converter)

_UNSUPPORTED = {"use_dora": (False, None), "layers_to_transform": (None, []), "target_parameters": (None, []),
                "loftq_config": (None, {})}
_TRAINING = ("tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")


def _peft_scale(alpha: float, rank: int) -> float:
    return (alpha if alpha > 0 else float(rank)) / (rank + 1e-5)


@register_converter
class AdaLoraConverter(PeftConverter):
    peft_type = "ADALORA"
    methods = ("adalora",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>lora_[AEB])$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "AdaLoRA")
        if cfg.get("bias", "none") != "none":
            raise PeftFormatError(f"{config_file}: bias={cfg['bias']!r} trains the base model's biases, which a "
                                  "deltakit AdaLoRA adapter does not hold; only bias='none'")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, AdaLoRA.supports, "Linear, Conv1D", "AdaLoRA")
        check_complete(src, AdaLoRA.supports, "AdaLoRA")
        cfg = src.cfg
        init_r, alpha = int(cfg.get("init_r", 12)), float(cfg.get("lora_alpha", 8))
        config = AdaLoraConfig(init_r=init_r, target_r=int(cfg.get("target_r", 8)), alpha=alpha,
                               dropout=float(cfg.get("lora_dropout") or 0.0), total_step=cfg.get("total_step"),
                               **{k: cfg[k] for k in _TRAINING if cfg.get(k) is not None},
                               targets=tuple(src.tensors), modules_to_save=src.full)
        state = {}
        for path, got in src.tensors.items():
            state.update(_padded(src, path, got, init_r, alpha))
        return PeftImport(config, state, list(src.tensors))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: AdaLoraConfig = adapter.config  # type: ignore[assignment]
        tensors: dict[str, Tensor] = {}
        pattern: dict[str, list[bool]] = {}
        for path, d in adapter.deltas():
            on = d.state == ON
            k = int(on.sum())
            if k == 0:
                raise PeftFormatError(f"adapter {adapter.name!r}: {path!r} has every component pruned; peft cannot "
                                      "load a rank-0 AdaLoRA target")
            gain = d.scale / _peft_scale(config.alpha, config.init_r)
            tensors[f"{path}.lora_A"] = d.lora_A.detach()[on]
            tensors[f"{path}.lora_E"] = (d.lora_E.detach()[on] * gain)[:, None]
            tensors[f"{path}.lora_B"] = d.lora_B.detach()[:, on]
            if k < config.init_r:
                pattern[f"{path}.lora_E"] = on.tolist()
        fields = {"peft_type": "ADALORA", "init_r": config.init_r, "target_r": config.target_r,
                  "lora_alpha": number(config.alpha), "lora_dropout": config.dropout,
                  "total_step": config.total_step or config.tinit + config.tfinal + 1,
                  **{k: getattr(config, k) for k in _TRAINING}, "rank_pattern": pattern or None,
                  "target_modules": sorted(p for p, _ in adapter.deltas()), "bias": "none",
                  "fan_in_fan_out": any(d.layout == "conv1d" for _, d in adapter.deltas()),
                  "init_lora_weights": True, "use_dora": False}
        return PeftExport(fields, tensors)


def _padded(src: PeftSource, path: str, got: dict[str, Tensor], init_r: int, alpha: float) -> dict[str, Tensor]:
    """One target's deltakit tensors: padded to ``init_r``, padding OFF, ``lora_E`` rescaled."""
    if set(got) != {"lora_A", "lora_E", "lora_B"}:
        raise PeftFormatError(f"{src.where}: {path!r} has {sorted(got)}, expected lora_A, lora_E, lora_B")
    a, e, b = got["lora_A"], got["lora_E"].reshape(-1), got["lora_B"]
    k = a.shape[0]
    if not (e.shape[0] == k == b.shape[1]) or k > init_r:
        raise PeftFormatError(f"{src.where}: {path!r}: lora_A / lora_E / lora_B ranks {a.shape[0]} / {e.shape[0]} / "
                              f"{b.shape[1]}, expected one rank <= init_r={init_r}")
    gain = _peft_scale(alpha, init_r) / (alpha / init_r)
    pad = init_r - k
    state = torch.full((init_r,), OFF, dtype=torch.int8)
    state[:k] = ON
    return {f"{path}.lora_A": torch.cat([a, a.new_zeros(pad, a.shape[1])]),
            f"{path}.lora_E": torch.cat([e * gain, e.new_zeros(pad)]),
            f"{path}.lora_B": torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1),
            f"{path}.state": state}
