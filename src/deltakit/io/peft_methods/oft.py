"""peft ``OFT`` <-> deltakit ``oft``.

peft keys::

    base_model.model.<path>.oft_R.weight   (r, b (b - 1) / 2)   each block's strict upper triangle Q

Both compute ``W' = W R^T`` with R block-diagonal, built from the skew-symmetric blocks
the same way, but peft's two Cayley forms disagree on the sign: its exact solve gives
``(I - Q)(I + Q)^{-1}`` while its default Neumann series (``use_cayley_neumann=True``)
expands ``(I + Q)(I - Q)^{-1}``, deltakit's convention. So:

* ``use_cayley_neumann=True`` -> ``cayley="neumann"`` with peft's number of terms, S = Q;
* ``use_cayley_neumann=False`` -> ``cayley="exact"``, S = -Q (negated on import and export).

COFT projects Q onto the same ball (radius ``eps / sqrt(r)``) in both. Not
representable: ``block_share``, and targets whose block counts and block sizes both
differ (deltakit has one ``r`` or one ``block_size`` per adapter). peft's OFT wraps
nn.Linear / nn.Conv2d, not GPT-2's Conv1D. ``module_dropout`` acts in training only and
deltakit's OFT has none: not carried over.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ...core.adapter import Adapter
from ...methods.oft import OFT, OFTConfig
from ._common import (PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, check_complete,
                      check_paths, linear_or_conv2d_only, refuse_fields, register_converter)

_UNSUPPORTED = {"block_share": (False, None), "target_parameters": (None, [])}


def _block_size(n_elements: int) -> int:
    """b with b (b - 1) / 2 == n_elements."""
    return (1 + math.isqrt(1 + 8 * n_elements)) // 2


@register_converter
class OftConverter(PeftConverter):
    peft_type = "OFT"
    methods = ("oft",)
    key = re.compile(r"^(?P<path>.+)\.(?P<param>oft_R\.weight)$")

    def check_config(self, cfg: dict, config_file: Path) -> None:
        refuse_fields(cfg, config_file, _UNSUPPORTED, "OFT")
        if cfg.get("bias", "none") != "none":
            raise PeftFormatError(f"{config_file}: bias={cfg['bias']!r} trains the base model's biases, which a "
                                  "deltakit OFT adapter does not hold; only bias='none'")

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        check_paths(src, OFT.supports, "Linear, Conv2d", "OFT")
        check_complete(src, OFT.supports, "OFT")
        qs = {p: got["oft_R.weight"] for p, got in src.tensors.items()}
        blocks = {int(q.shape[0]) for q in qs.values()}
        sizes = {_block_size(int(q.shape[1])) for q in qs.values()}
        if len(sizes) == 1:
            shape = dict(block_size=sizes.pop(), r=0)
        elif len(blocks) == 1:
            shape = dict(r=blocks.pop(), block_size=0)
        else:
            raise PeftFormatError(f"{src.where}: targets differ in both block count {sorted(blocks)} and block size "
                                  f"{sorted(sizes)}; deltakit's OFT has one r or one block_size per adapter")
        cfg = src.cfg
        neumann = bool(cfg.get("use_cayley_neumann", True))
        config = OFTConfig(**shape, coft=bool(cfg.get("coft", False)), eps=float(cfg.get("eps", 6e-5)),
                           cayley="neumann" if neumann else "exact",
                           neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)),
                           targets=tuple(qs), modules_to_save=src.full)
        state = {f"{p}.oft_S": q if neumann else -q for p, q in qs.items()}
        return PeftImport(config, state, list(qs))

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: OFTConfig = adapter.config  # type: ignore[assignment]
        linear_or_conv2d_only(adapter, "OFT")
        neumann = config.cayley == "neumann"
        tensors = {f"{p}.oft_R.weight": d.oft_S.detach() if neumann else -d.oft_S.detach()
                   for p, d in adapter.deltas()}
        fields = {"peft_type": "OFT", "r": config.r, "oft_block_size": config.block_size,
                  "target_modules": sorted(p for p, _ in adapter.deltas()), "exclude_modules": None,
                  "module_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "init_weights": True,
                  "coft": config.coft, "eps": config.eps, "block_share": False,
                  "use_cayley_neumann": neumann, "num_cayley_neumann_terms": config.neumann_terms,
                  "layers_to_transform": None, "layers_pattern": None}
        return PeftExport(fields, tensors)
