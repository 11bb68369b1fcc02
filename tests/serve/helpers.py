"""A tiny random Llama with a word-level chat tokenizer and LoRA adapters of different ranks,
for the serving tests (milliseconds per forward)."""
from __future__ import annotations

from pathlib import Path

import torch

import deltakit as dk
from tests.conftest import word_chat_tokenizer

WORDS = [f"w{i}" for i in range(59)]
RANKS = {"a": 2, "b": 4, "c": 8}


def tiny_lm(seed: int = 0, context: int = 128):
    """(model, tokenizer): a 2-layer Llama whose vocabulary is the tokenizer's; EOS '</s>'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_chat_tokenizer(WORDS)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                      bos_token_id=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    tok.padding_side = "left"
    return model, tok


def randomize(adapter, seed: int) -> None:
    """Non-zero random factors so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def attach_adapters(model, ranks: dict[str, int] = RANKS) -> None:
    for i, (name, r) in enumerate(ranks.items()):
        randomize(dk.attach(model, dk.LoraConfig(r=r), name=name), 100 + i)


def save_adapters(model, root: Path, ranks: dict[str, int] = RANKS) -> dict[str, Path]:
    """Each adapter saved under ``root/<name>`` (attached, randomized, saved, detached)."""
    out = {}
    for i, (name, r) in enumerate(ranks.items()):
        ad = dk.attach(model, dk.LoraConfig(r=r), name=name)
        randomize(ad, 100 + i)
        out[name] = dk.save_adapter(ad, root / name)
        dk.detach(model, name)
    return out
