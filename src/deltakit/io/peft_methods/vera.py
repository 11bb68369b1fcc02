"""peft ``VERA`` <-> deltakit ``vera``.

peft keys::

    base_model.model.<path>.vera_lambda_d   (r,)
    base_model.model.<path>.vera_lambda_b   (out,)
    base_model.vera_A   (r, in_max)   base_model.vera_B   (out_max, r)   with save_projection=True

Both libraries draw the shared pair the same way (kaiming-uniform A then B from one CPU
generator seeded with ``projection_prng_key`` = deltakit's ``seed``), and deltakit
regenerates it rather than storing it. So on import the saved projections, when present,
must equal deltakit's regeneration bit for bit (a mismatch, e.g. from another peft
version's init, is an error rather than a silently different adapter); on export they
are written (``save_projection=True``, peft's default) so peft need not regenerate.
``vera_dropout`` acts in training only and deltakit's VeRA has none: not carried over.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...core.adapter import Adapter
from ...methods._base_ops import in_out
from ...methods.vera import VeRA, VeraConfig, VeraShared
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, refuse_fields, register_converter)

_UNSUPPORTED = {"target_parameters": (None, []), "layers_to_transform": (None, [])}
_A, _B = "base_model.vera_A", "base_model.vera_B"


@register_converter
class VeraConverter(PeftConverter):
    peft_type = "VERA"
    methods = ("vera",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>vera_lambda_[bd])$")
    shared_key = re.compile(r"base_model\.vera_[AB]")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "VeRA")
        if cfg.get("bias", "none") != "none":
            raise PeftFormatError(f"{config_file}: bias={cfg['bias']!r} trains the base model's biases, which a "
                                  "deltakit VeRA adapter does not hold; only bias='none'")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, VeRA.supports, "Linear, Conv1D", "VeRA")
        check_complete(src, VeRA.supports, "VeRA")
        cfg = src.cfg
        config = VeraConfig(r=int(cfg.get("r", 256)), d_initial=float(cfg.get("d_initial", 0.1)),
                            seed=int(cfg.get("projection_prng_key", 0)), targets=tuple(src.tensors),
                            modules_to_save=src.full)
        if src.shared:
            _check_projections(src, config)
        elif cfg.get("save_projection", True):
            raise PeftFormatError(f"{src.where}: save_projection=True but the file has no {_A} / {_B}")
        state = {f"{p}.{k}": t for p, got in src.tensors.items() for k, t in got.items()}
        return PeftImport(config, state, list(src.tensors))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: VeraConfig = adapter.config  # type: ignore[assignment]
        tensors = {f"{p}.{k}": getattr(d, k).detach() for p, d in adapter.deltas()
                   for k in ("vera_lambda_b", "vera_lambda_d")}
        shared = adapter.shared
        fields = {"peft_type": "VERA", "r": config.r, "target_modules": sorted(p for p, _ in adapter.deltas()),
                  "projection_prng_key": config.seed, "save_projection": True, "vera_dropout": 0.0,
                  "d_initial": config.d_initial, "bias": "none", "init_weights": True,
                  "fan_in_fan_out": any(d.layout == "conv1d" for _, d in adapter.deltas()),
                  "layers_to_transform": None, "layers_pattern": None}
        return PeftExport(fields, tensors, {_A: shared.vera_A.detach().cpu(), _B: shared.vera_B.detach().cpu()})


def _check_projections(src: PeftSource, config: VeraConfig) -> None:
    """peft's saved pair == the one deltakit regenerates from the seed for these targets."""
    if set(src.shared) != {_A, _B}:
        raise PeftFormatError(f"{src.where}: expected both {_A} and {_B}, found {sorted(src.shared)}")
    dims = [in_out(src.modules[p]) for p in src.tensors]
    ours = VeraShared(config.r, max(i for i, _ in dims), max(o for _, o in dims), config.seed, torch.device("cpu"))
    for key, mine in ((_A, ours.vera_A), (_B, ours.vera_B)):
        theirs = src.shared[key]
        if tuple(theirs.shape) != tuple(mine.shape) or not torch.equal(theirs.float(), mine):
            raise PeftFormatError(f"{src.where}: {key} {tuple(theirs.shape)} differs from deltakit's regeneration "
                                  f"{tuple(mine.shape)} from projection_prng_key={config.seed}")
