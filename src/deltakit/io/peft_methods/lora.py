"""peft ``LORA`` <-> deltakit ``lora``.

peft keys, relative to the model (``base_model.model.`` stripped)::

    <path>.lora_A.weight        (r, in)    Linear / Conv1D; (r, in, kh, kw) Conv2d
    <path>.lora_B.weight        (out, r)   Linear / Conv1D; (out, r, 1, 1) Conv2d
    <path>.lora_embedding_A     (r, num_embeddings)
    <path>.lora_embedding_B     (dim, r)

These are exactly deltakit's LoRA layouts, so tensors copy unchanged; the scale is
``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) in both.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from ...core.adapter import Adapter
from ...methods.lora import LoRA, LoraConfig
from ._common import (PREFIX, PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, pattern_lookup, refuse_fields, register_converter)

# peft init_lora_weights values that only choose how A/B start (the saved tensors say
# the rest) -> deltakit's LoraConfig.init. Values not listed (pissa, olora, corda,
# loftq) also rewrite the base weights, so the adapter alone does not reproduce them.
_INIT_FROM_PEFT = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "orthogonal": "orthogonal",
                   "eva": "kaiming"}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}

# Config fields that switch on something deltakit's LoRA does not do: (field, "off" values).
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None, {}),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "velora_config": (None, {}),
    "modules_to_tie": (None, []),
}

# peft tensor name -> deltakit LoRA parameter
_PARAMS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A",
           "lora_embedding_B": "lora_B"}


@register_converter
class LoraConverter(PeftConverter):
    peft_type = "LORA"
    methods = ("lora",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>lora_[AB]\.weight|lora_embedding_[AB]|lora_magnitude_vector)$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "LoRA")
        if cfg.get("bias", "none") != "none":
            raise PeftFormatError(f"{config_file}: bias={cfg['bias']!r} (trained biases) is not supported; "
                                  "only bias='none'")
        init = cfg.get("init_lora_weights", True)
        if init not in _INIT_FROM_PEFT:
            raise PeftFormatError(f"{config_file}: init_lora_weights={init!r} changes the base weights, so the "
                                  "adapter alone does not reproduce the model; convert it with peft's "
                                  "path_initial_model_for_weight_conversion first")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        pairs = _pairs(src)
        check_paths(src, LoRA.supports, "Linear, Conv1D, Conv2d, Embedding", "LoRA")
        for path, (a, b) in pairs.items():
            if a.shape[0] != b.shape[1]:
                raise PeftFormatError(f"{src.where}: {path}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
        check_complete(src, LoRA.supports, "LoRA")
        r, alpha = _rank_and_alpha(pairs, src.cfg, src.where)
        cfg = src.cfg
        config = LoraConfig(
            r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
            use_rslora=bool(cfg.get("use_rslora", False)),
            init=_INIT_FROM_PEFT.get(cfg.get("init_lora_weights", True), "kaiming"),
            targets=tuple(pairs), modules_to_save=src.full)
        state = {f"{p}.{k}": t for p, (a, b) in pairs.items() for k, t in (("lora_A", a), ("lora_B", b))}
        return PeftImport(config, state, list(pairs))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: LoraConfig = adapter.config  # type: ignore[assignment]
        tensors: dict[str, Tensor] = {}
        conv1d = []
        for path, delta in adapter.deltas():
            emb = delta.layout == "embedding"
            tensors[f"{path}.lora_embedding_A" if emb else f"{path}.lora_A.weight"] = delta.lora_A.detach()
            tensors[f"{path}.lora_embedding_B" if emb else f"{path}.lora_B.weight"] = delta.lora_B.detach()
            conv1d.append(delta.layout == "conv1d")
        fields = {
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "target_modules": sorted(p for p, _ in adapter.deltas()),
            "exclude_modules": None,
            "fan_in_fan_out": bool(conv1d) and all(conv1d),
            "bias": "none",
            "init_lora_weights": _INIT_TO_PEFT[config.init],
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }
        return PeftExport(fields, tensors)


def _pairs(src: PeftSource) -> dict[str, tuple[Tensor, Tensor]]:
    """{path: (A, B)} in file order, each with both factors."""
    pairs = {}
    for path, got in src.tensors.items():
        if "lora_magnitude_vector" in got:
            raise PeftFormatError(f"{src.where}: tensor {PREFIX}{path}.lora_magnitude_vector is a DoRA magnitude; "
                                  "DoRA adapters are not supported")
        ab = {_PARAMS[k][-1]: t for k, t in got.items()}
        if set(ab) != {"A", "B"}:
            raise PeftFormatError(f"{src.where}: module {path!r} has lora_{''.join(sorted(ab))} but not both A and B")
        pairs[path] = (ab["A"], ab["B"])
    return pairs


def _rank_and_alpha(pairs, cfg: dict, weights: Path) -> tuple[int, float]:
    """One (r, alpha) for all targets: ranks from the tensors, alpha from the config
    (``alpha_pattern`` resolved as peft does). Non-uniform values are an error."""
    from_pattern = pattern_lookup(cfg.get("alpha_pattern") or {})
    ranks = {p: int(a.shape[0]) for p, (a, _) in pairs.items()}
    alphas = {p: float(from_pattern(p, cfg.get("lora_alpha", 8))) for p in pairs}
    for what, values in (("rank (r / rank_pattern)", ranks), ("lora_alpha (alpha_pattern)", alphas)):
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            examples = {v: next(p for p in values if values[p] == v) for v in distinct}
            raise PeftFormatError(f"{weights}: non-uniform {what} across targets is not supported: "
                                  + ", ".join(f"{v:g} at {p!r}" for v, p in examples.items()))
    r = next(iter(ranks.values()))
    alpha = next(iter(alphas.values()))
    declared = pattern_lookup(cfg.get("rank_pattern") or {})
    want = {declared(p, cfg.get("r", r)) for p in pairs}
    if want != {r}:
        raise PeftFormatError(f"{weights}: tensors have rank {r}, the config declares r={sorted(want)}")
    return r, alpha
