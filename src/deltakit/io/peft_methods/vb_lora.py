"""peft ``VBLORA`` <-> deltakit ``vb_lora``.

peft keys::

    base_model.vblora_vector_bank                       (h, b)        the shared bank
    base_model.model.<path>.vblora_logits_A             (r, in / b, h)
    base_model.model.<path>.vblora_logits_B             (out / b, r, h)
  or, with ``save_only_topk_weights=True``:
    base_model.model.<path>.vblora_logits_[AB]_topk_indices   (..., k)     uint8 / int16 / int32
    base_model.model.<path>.vblora_logits_[AB]_topk_weights   (..., k - 1) the softmax of the top-k
                                                                            logits, the last left out

Same layouts and maths (dW = B A, each sub-vector a softmax admixture of its top-k bank
vectors). deltakit's top-k storage keeps logit values rather than softmax weights:
import takes ``log`` of the weights (the last one is ``1 - sum``), whose softmax gives
the weights back; export writes peft's form with the same choice of full logits or
top-k only (``save_only_topk`` <-> ``save_only_topk_weights``). ``vblora_dropout`` acts in
training only and deltakit's VB-LoRA has none: not carried over.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ...core.adapter import SHARED, Adapter
from ...methods.vb_lora import VBLoRA, VBLoraConfig
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, refuse_fields, register_converter)

_BANK = "base_model.vblora_vector_bank"
_LOGITS = ("vblora_logits_A", "vblora_logits_B")
_UNSUPPORTED = {"target_parameters": (None, []), "layers_to_transform": (None, [])}


@register_converter
class VBLoraConverter(PeftConverter):
    peft_type = "VBLORA"
    methods = ("vb_lora",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>vblora_logits_[AB](?:_topk_indices|_topk_weights)?)$")
    shared_key = re.compile(re.escape(_BANK))

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "VB-LoRA")
        if cfg.get("bias", "none") != "none":
            raise PeftFormatError(f"{config_file}: bias={cfg['bias']!r} trains the base model's biases, which a "
                                  "deltakit VB-LoRA adapter does not hold; only bias='none'")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, VBLoRA.supports, "Linear, Conv1D", "VB-LoRA")
        check_complete(src, VBLoRA.supports, "VB-LoRA")
        if _BANK not in src.shared:
            raise PeftFormatError(f"{src.where}: no {_BANK} tensor")
        cfg, topk_only = src.cfg, bool(src.cfg.get("save_only_topk_weights", False))
        h, b = src.shared[_BANK].shape
        config = VBLoraConfig(r=int(cfg.get("r", 4)), num_vectors=int(h), vector_length=int(b),
                              topk=int(cfg.get("topk", 2)), save_only_topk=topk_only,
                              targets=tuple(src.tensors), modules_to_save=src.full)
        state = {f"{SHARED}.vector_bank": src.shared[_BANK]}
        for p, got in src.tensors.items():
            for name in _LOGITS:
                state.update(_logits(src, p, name, got, topk_only))
        return PeftImport(config, state, list(src.tensors))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: VBLoraConfig = adapter.config  # type: ignore[assignment]
        tensors: dict[str, Tensor] = {}
        idx_dtype = torch.uint8 if config.num_vectors < 2 ** 8 else (
            torch.int16 if config.num_vectors < 2 ** 15 else torch.int32)
        for p, d in adapter.deltas():
            for name in _LOGITS:
                z = getattr(d, name).detach()
                if not config.save_only_topk:
                    tensors[f"{p}.{name}"] = z
                    continue
                vals, idx = z.topk(config.topk, dim=-1)
                tensors[f"{p}.{name}_topk_indices"] = idx.to(idx_dtype)
                tensors[f"{p}.{name}_topk_weights"] = torch.softmax(vals, dim=-1)[..., :-1].contiguous()
        fields = {"peft_type": "VBLORA", "r": config.r, "num_vectors": config.num_vectors,
                  "vector_length": config.vector_length, "topk": config.topk,
                  "save_only_topk_weights": config.save_only_topk, "vblora_dropout": 0.0,
                  "target_modules": sorted(p for p, _ in adapter.deltas()), "exclude_modules": None,
                  "fan_in_fan_out": any(d.layout == "conv1d" for _, d in adapter.deltas()), "bias": "none",
                  "init_vector_bank_bound": config.init_bank_bound, "init_logits_std": config.init_logits_std,
                  "layers_to_transform": None, "layers_pattern": None}
        return PeftExport(fields, tensors, {_BANK: adapter.shared.vector_bank.detach()})


def _logits(src: PeftSource, path: str, name: str, got: dict[str, Tensor], topk_only: bool) -> dict[str, Tensor]:
    """One logits tensor of one target, as deltakit's state dict holds it."""
    if not topk_only:
        if name not in got:
            raise PeftFormatError(f"{src.where}: {path!r} has no {name}")
        return {f"{path}.{name}": got[name]}
    idx, w = got.get(f"{name}_topk_indices"), got.get(f"{name}_topk_weights")
    if idx is None or w is None:
        raise PeftFormatError(f"{src.where}: save_only_topk_weights=True but {path!r} lacks {name}_topk_indices "
                              "or _topk_weights")
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    return {f"{path}.{name}_topk_values": torch.log(w), f"{path}.{name}_topk_indices": idx.to(torch.long)}
