"""peft ``LORA`` <-> deltakit ``lora`` (and ``dora`` for ``use_dora=True``).

peft keys, relative to the model (``base_model.model.`` stripped)::

    <path>.lora_A.weight          (r, in)    Linear / Conv1D; (r, in, kh, kw) Conv2d
    <path>.lora_B.weight          (out, r)   Linear / Conv1D; (out, r, 1, 1) Conv2d
    <path>.lora_embedding_A       (r, num_embeddings)
    <path>.lora_embedding_B       (dim, r)
    <path>.lora_magnitude_vector  (out,)     DoRA's m

These are exactly deltakit's LoRA / DoRA layouts (DoRA's m is the per-output-unit norm
in both, ``||W + s B A||`` detached in peft, as deltakit's default ``detach_norm``), so
tensors copy unchanged; the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
deltakit's DoRA has no dropout (its update is applied as a dense weight), so a DoRA
import drops peft's ``lora_dropout``, which acts in training only.

``rank_pattern`` / ``alpha_pattern``: deltakit's LoRA has one ``r`` and ``alpha`` per
adapter, so per-target ranks and scales are imported exactly rather than refused: each
target's factors are zero-padded to the largest rank and its ``lora_B`` multiplied by
``its scale / the adapter's scale``. The product ``s B A`` is unchanged (within float
rounding), and the padded rows / columns get zero gradients (each one's gradient goes
through the other's zeros), so further training behaves as peft's smaller rank would.
The cost is the padded parameters. Per-target ranks in ``LoraConfig`` itself would have
to reach every LoRA-derived method and the search space; padding keeps that out of core.

``init_lora_weights="pissa"`` / ``"olora"``: peft rewrote the base to ``W - s B0 A0``
(top-r SVD / QR of W), so the saved factors alone do not reproduce the model. The
import recomputes (A0, B0) from the untouched base as peft does and stores
``[A; A0]``, ``[B, -B0]`` at rank 2r (peft's own ``path_initial_model_for_weight_conversion``
result). ``pissa_niter_*`` (randomised SVD), CorDA and LoftQ are refused.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ...core.adapter import Adapter
from ...methods._base_ops import Conv1D
from ...methods.dora import DoRA, DoraConfig
from ...methods.lora import LoRA, LoraConfig
from ._common import (PREFIX, PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, pattern_lookup, per_target_scales, refuse_fields, register_converter)

# peft init_lora_weights values that only choose how A/B start (the saved tensors say
# the rest) -> deltakit's LoraConfig.init. Values not listed (pissa, olora, corda,
# loftq) also rewrite the base weights, so the adapter alone does not reproduce them.
_INIT_FROM_PEFT = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "orthogonal": "orthogonal",
                   "eva": "kaiming"}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}

# Config fields that switch on something deltakit's LoRA does not do: (field, "off" values).
_UNSUPPORTED = {
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
_PARAMS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
           "lora_magnitude_vector": "m"}


@register_converter
class LoraConverter(PeftConverter):
    peft_type = "LORA"
    methods = ("lora", "dora")
    key = re.compile(r"^(?P<path>.+)\.(?P<param>lora_[AB]\.weight|lora_embedding_[AB]|lora_magnitude_vector)$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "LoRA")
        if cfg.get("bias", "none") != "none":
            raise PeftFormatError(f"{config_file}: bias={cfg['bias']!r} trains the base model's biases, which a "
                                  "deltakit LoRA adapter does not hold; only bias='none' (train biases with a "
                                  "separate bitfit adapter)")
        init = cfg.get("init_lora_weights", True)
        if init not in _INIT_FROM_PEFT and init not in _RESIDUAL_INITS:
            raise PeftFormatError(f"{config_file}: init_lora_weights={init!r} changes the base weights in a way "
                                  "deltakit cannot recompute, so the adapter alone does not reproduce the model; "
                                  "convert it with peft's path_initial_model_for_weight_conversion first")
        if init in _RESIDUAL_INITS and cfg.get("use_dora"):
            raise PeftFormatError(f"{config_file}: init_lora_weights={init!r} with use_dora=True is not supported")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        dora = bool(src.cfg.get("use_dora"))
        factors = _factors(src, dora)
        cls = DoRA if dora else LoRA
        kinds = "Linear, Conv1D, Conv2d" + ("" if dora else ", Embedding")
        check_paths(src, cls.supports, kinds, "DoRA" if dora else "LoRA")
        check_complete(src, cls.supports, "LoRA")
        r, alpha, gains = _rank_and_alpha(factors, src.cfg, src.where)
        cfg = src.cfg
        residual = _RESIDUAL_INITS.get(cfg.get("init_lora_weights", True))
        if residual is not None:  # the residual's rank-r factors join the adapter, at the same scale
            r, alpha = 2 * r, alpha * (math.sqrt(2) if cfg.get("use_rslora") else 2)
        common = dict(r=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)),
                      init=_INIT_FROM_PEFT.get(cfg.get("init_lora_weights", True), "kaiming"),
                      targets=tuple(factors), modules_to_save=src.full)
        # peft's lora_dropout only acts in training; deltakit's DoRA has no branch input to drop
        config = (DoraConfig(**common) if dora
                  else LoraConfig(dropout=float(cfg.get("lora_dropout") or 0.0), **common))
        state = {}
        for p, f in factors.items():
            if residual is None:
                state[f"{p}.lora_A"], state[f"{p}.lora_B"] = _pad(f["A"], f["B"], r, gains[p])
            else:
                state[f"{p}.lora_A"], state[f"{p}.lora_B"] = _with_residual(src, p, f, r, gains[p], residual)
            if dora:
                state[f"{p}.magnitude"] = f["m"]
        return PeftImport(config, state, list(factors))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: LoraConfig = adapter.config  # type: ignore[assignment]
        dora = isinstance(config, DoraConfig)
        if dora and not config.detach_norm:
            raise PeftFormatError(f"adapter {adapter.name!r}: DoRA with detach_norm=False has no peft equivalent "
                                  "(peft always detaches the norm)")
        tensors: dict[str, Tensor] = {}
        conv1d = []
        for path, delta in adapter.deltas():
            emb = delta.layout == "embedding"
            tensors[f"{path}.lora_embedding_A" if emb else f"{path}.lora_A.weight"] = delta.lora_A.detach()
            tensors[f"{path}.lora_embedding_B" if emb else f"{path}.lora_B.weight"] = delta.lora_B.detach()
            if dora:
                tensors[f"{path}.lora_magnitude_vector"] = delta.magnitude.detach()
            conv1d.append(delta.layout == "conv1d")
        return PeftExport(_peft_fields(config, sorted(p for p, _ in adapter.deltas()), conv1d, dora), tensors)


def _peft_fields(config: LoraConfig, targets: list[str], conv1d: list[bool], dora: bool) -> dict:
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": targets,
        "exclude_modules": None,
        "fan_in_fan_out": bool(conv1d) and all(conv1d),
        "bias": "none",
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": dora,
    }


def _factors(src: PeftSource, dora: bool) -> dict[str, dict[str, Tensor]]:
    """{path: {"A", "B"[, "m"]}} in file order, each complete and rank-consistent."""
    out = {}
    for path, got in src.tensors.items():
        f = {_PARAMS[k]: t for k, t in got.items()}
        if "m" in f and not dora:
            raise PeftFormatError(f"{src.where}: tensor {PREFIX}{path}.lora_magnitude_vector is a DoRA magnitude "
                                  "but the config has use_dora=false")
        if dora and "m" not in f:
            raise PeftFormatError(f"{src.where}: the config has use_dora=True but {path!r} has no "
                                  "lora_magnitude_vector")
        if not {"A", "B"} <= set(f):
            have = "".join(sorted(set(f) & {"A", "B"}))
            raise PeftFormatError(f"{src.where}: module {path!r} has lora_{have} but not both A and B")
        if f["A"].shape[0] != f["B"].shape[1]:
            raise PeftFormatError(f"{src.where}: {path}: lora_A rank {f['A'].shape[0]} != lora_B rank "
                                  f"{f['B'].shape[1]}")
        out[path] = f
    return out


def _rank_and_alpha(factors, cfg: dict, weights: Path) -> tuple[int, float, dict[str, float]]:
    """One (r, alpha) for the adapter and each target's ``lora_B`` gain (see the module doc)."""
    ranks = {p: int(f["A"].shape[0]) for p, f in factors.items()}
    return per_target_scales(cfg, ranks, "lora_alpha", bool(cfg.get("use_rslora", False)), weights)


def _pissa(w: Tensor, r: int, s: float) -> tuple[Tensor, Tensor]:
    """peft's ``pissa_init``: (A0, B0) from the top-r SVD of W (out, in), with s B0 A0 its rank-r part."""
    v, sv, uh = torch.linalg.svd(w, full_matrices=False)
    sr = sv[:r] / s
    return torch.diag(torch.sqrt(sr)) @ uh[:r], v[:, :r] @ torch.diag(torch.sqrt(sr))


def _olora(w: Tensor, r: int, s: float) -> tuple[Tensor, Tensor]:
    """peft's ``olora_init``: A0 = R[:r], B0 = Q[:, :r] of W = QR (peft subtracts s B0 A0)."""
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


# init_lora_weights values whose adapter is relative to W - s B0 A0, with (A0, B0) recomputable from W
_RESIDUAL_INITS = {"pissa": _pissa, "olora": _olora}


def _with_residual(src: PeftSource, path: str, f: dict[str, Tensor], r: int, gain: float, init) -> tuple[Tensor, Tensor]:
    """PiSSA / OLoRA: peft's base is W - s B0 A0, deltakit's is W, so the adapter becomes
    ``[A; A0]``, ``[B, -B0]`` (rank 2 r_p, as peft's own conversion), each half padded to r / 2."""
    base = src.modules[path]
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise PeftFormatError(f"{src.where}: {path!r} is a {type(base).__name__}; a PiSSA / OLoRA residual is "
                              "recomputed for Linear and Conv1D targets only")
    w = base.weight.detach().float()
    w = w.t() if isinstance(base, Conv1D) else w                      # (out, in)
    k = f["A"].shape[0]
    a0, b0 = init(w, k, _peft_scale(src.cfg, path, k))
    a, b = _pad(f["A"], f["B"], r // 2, gain)
    a0, b0 = _pad(a0.to(f["A"].dtype), -b0.to(f["B"].dtype), r // 2, gain)
    return torch.cat([a, a0]), torch.cat([b, b0], dim=1)


def _peft_scale(cfg: dict, path: str, k: int) -> float:
    alpha = float(pattern_lookup(cfg.get("alpha_pattern") or {})(path, cfg.get("lora_alpha", 8)))
    return alpha / (math.sqrt(k) if cfg.get("use_rslora") else k)


def _pad(a: Tensor, b: Tensor, r: int, gain: float) -> tuple[Tensor, Tensor]:
    """A (k, ...) and B (out, k, ...) zero-padded to rank r, B times ``gain``."""
    k = a.shape[0]
    if gain != 1.0:
        b = b * gain
    if k == r:
        return a, b
    a = torch.cat([a, a.new_zeros(r - k, *a.shape[1:])], dim=0)
    b = torch.cat([b, b.new_zeros(b.shape[0], r - k, *b.shape[2:])], dim=1)
    return a, b
