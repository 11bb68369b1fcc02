"""``deltakit generate``: an adapter on its recorded causal-LM base, prompts from flags and a file, errors."""
from __future__ import annotations

import json

import pytest
import torch

import deltakit as dk
from deltakit.cli import main
from deltakit.train.generate import generate
from tests.train.test_instruct import tok  # noqa: F401  (the word-level chat tokenizer fixture)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tok):  # noqa: F811
    """A tiny random Llama with the chat tokenizer, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def adapter_dir(lm_dir, tmp_path_factory):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    ad = dk.attach(model, dk.LoraConfig(r=4, targets=("q_proj", "v_proj", "o_proj")), name="chat")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("adapters") / "chat"
    dk.save_adapter(ad, out)
    return out


def _reference(lm_dir, adapter_dir, prompts, **kw):
    from transformers import AutoTokenizer, LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    if adapter_dir is not None:
        dk.load_adapter(model, adapter_dir)
    t = AutoTokenizer.from_pretrained(lm_dir)
    return generate(model.eval(), t, prompts, **kw)


def test_adapter_on_its_recorded_base_prints_what_the_library_generates(lm_dir, adapter_dir, tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    convo = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "how old are you"}]
    f.write_text(json.dumps({"prompt": "what is two plus four"}) + "\n\n" + json.dumps({"messages": convo}) + "\n")
    argv = [str(adapter_dir), "--prompt", "hi there", "--file", str(f), "--max-new-tokens", "5", "--json"]
    assert main(["generate", *argv]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    prompts = ["hi there", "what is two plus four", convo]
    ref = _reference(lm_dir, adapter_dir, prompts, max_new_tokens=5)
    assert [x["prompt"] for x in lines] == prompts and [x["output"] for x in lines] == ref
    base = _reference(lm_dir, None, prompts, max_new_tokens=5)
    assert base != ref                                  # the adapter is in the path
    # sampling is reproducible for one seed, plain output one line per prompt
    samp = ["generate", str(adapter_dir), "--prompt", "hi there", "--sample", "--temperature", "2", "--seed", "5",
            "--max-new-tokens", "5"]
    assert main(samp) == 0
    first = capsys.readouterr().out
    assert main(samp) == 0 and capsys.readouterr().out == first
    want = _reference(lm_dir, adapter_dir, ["hi there"], max_new_tokens=5, do_sample=True, temperature=2.0, seed=5)
    assert first == want[0] + "\n"


def test_a_model_directory_and_raw_text(lm_dir, capsys):
    assert main(["generate", str(lm_dir), "--prompt", "hi there", "--no-chat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == _reference(lm_dir, None, ["hi there"], max_new_tokens=4, chat=False)[0] + "\n"


@pytest.mark.parametrize("content,needle", [
    ("", "expected at least one prompt, found an empty file"),
    ("{not json\n", "line 1: expected a JSON object, found invalid JSON"),
    ('{"prompt": "hi"}\n{"text": "x"}\n', 'line 2: expected {"prompt": text} or {"messages": [...]}'),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "prompt 0: message 0: expected"),
])
def test_bad_prompt_files_fail_in_one_line(lm_dir, tmp_path, content, needle, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    assert main(["generate", str(lm_dir), "--file", str(f)]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_other_errors_fail_in_one_line(lm_dir, adapter_dir, tiny_model_dir, tmp_path, capsys):
    cases = [
        (["generate", str(lm_dir)], "expected at least one --prompt or a --file"),
        (["generate", str(lm_dir), "--prompt", "hi", "--model", str(lm_dir)], "--model applies to an adapter"),
        (["generate", str(lm_dir), "--prompt", "hi", "--sample", "--temperature", "0"], "temperature > 0"),
        (["generate", str(lm_dir), "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens >= 1"),
    ]
    for argv, needle in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (argv, err)
    # an adapter on a classifier is not something to generate with
    from transformers import BertForSequenceClassification
    clf = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    dk.save_adapter(dk.attach(clf, dk.LoraConfig(r=2, targets=("query",))), tmp_path / "clf")
    assert main(["generate", str(tmp_path / "clf"), "--prompt", "hi"]) == 1
    assert "expected an adapter on a causal LM (*ForCausalLM), found one on BertForSequenceClassification" \
        in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0 and "usage: deltakit generate" in capsys.readouterr().out
