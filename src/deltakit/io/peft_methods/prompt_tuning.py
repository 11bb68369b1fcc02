"""peft ``PROMPT_TUNING`` <-> deltakit ``prompt_tuning``.

peft keys (prompt-learning methods have no wrapper, so modules sit under ``base_model.``)::

    prompt_embeddings                   (n, d)   the soft prompt
    base_model.<path>.<param>           modules_to_save, e.g. ``base_model.classifier.weight``
                                        (peft's SEQ_CLS saves the head there)

deltakit attaches the prompt to the backbone (``model.base_model_prefix``: ``bert``,
``transformer``, ``model``) and, unlike peft, strips the ``n`` virtual positions from
the outputs, so peft's causal-LM logits equal deltakit's after their first ``n``
positions. Not representable: encoder-decoder prompts (``num_transformer_submodules``
2). ``prompt_tuning_init`` only says how peft started; the saved prompt is used as is.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ...core.adapter import Adapter
from ...methods.prompt_tuning import PromptTuningConfig
from ._common import PeftConverter, PeftExport, PeftFormatError, PeftImport, PeftSource, register_converter

_KEY = "prompt_embeddings"


def backbone(model: nn.Module, where: object) -> str:
    """The path of the transformers backbone a prompt attaches to."""
    name = getattr(model, "base_model_prefix", None)
    if not name or not isinstance(getattr(model, name, None), nn.Module):
        raise PeftFormatError(f"{where}: {type(model).__name__} has no transformers backbone (base_model_prefix) "
                              "to attach a prompt to")
    return name


class VirtualTokenConverter(PeftConverter):
    """What prompt and prefix tuning share in peft's files: one ``prompt_embeddings`` tensor under
    ``base_model.`` (no per-module tensors), a task model, and a single transformer stack."""

    key = re.compile(r"(?!)")  # no per-module tensors
    shared_key = re.compile(_KEY)
    prefix = "base_model."
    needs_task_type = True
    what: str = "prompts"  # for messages

    def check_config(self, cfg: dict, config_file: Path) -> None:
        if cfg.get("num_transformer_submodules", 1) not in (1, None):
            raise PeftFormatError(f"{config_file}: num_transformer_submodules="
                                  f"{cfg['num_transformer_submodules']!r} (encoder-decoder {self.what}) is not "
                                  "supported; deltakit prompts a decoder or an encoder")


@register_converter
class PromptTuningConverter(VirtualTokenConverter):
    peft_type = "PROMPT_TUNING"
    methods = ("prompt_tuning",)

    def to_deltakit(self, src: PeftSource) -> PeftImport:
        prompt = src.shared.get(_KEY)
        if prompt is None:
            raise PeftFormatError(f"{src.where}: no {_KEY} tensor")
        n = int(src.cfg.get("num_virtual_tokens") or prompt.shape[0])
        if prompt.shape[0] != n:
            raise PeftFormatError(f"{src.where}: {_KEY} has {prompt.shape[0]} rows, the config declares "
                                  f"num_virtual_tokens={n}")
        path = backbone(src.model, src.where)
        config = PromptTuningConfig(num_virtual_tokens=n, targets=(path,), modules_to_save=src.full)
        return PeftImport(config, {f"{path}.prompt_embeddings": prompt}, [path])

    def from_deltakit(self, adapter: Adapter) -> PeftExport:
        config: PromptTuningConfig = adapter.config  # type: ignore[assignment]
        ((_, d),) = adapter.deltas()
        fields = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
                  "token_dim": int(d.prompt_embeddings.shape[1]), "num_transformer_submodules": 1,
                  "num_attention_heads": None, "num_layers": None, "prompt_tuning_init": "RANDOM",
                  "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
        return PeftExport(fields, {}, {_KEY: d.prompt_embeddings.detach()})
