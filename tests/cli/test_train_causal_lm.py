"""`deltakit train --task causal-lm` on a tiny random Llama saved with a word-level chat tokenizer:
instruction JSONL and GLUE-style task directories train and save, truncation is printed, and bad
input is a one-line error naming the file and line, before any model loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltakit as dk
from deltakit.cli import main
from tests.conftest import word_chat_tokenizer

WORDS = ("system user assistant what is two plus four six one three seven five eight colour of the sky grass "
         "blue green positive negative a good bad film fine dull Review: Answer").split()
FACTS = [("what is two plus four", "six"), ("what is one plus two", "three"),
         ("what is the colour of the sky", "blue"), ("what is the colour of the grass", "green"),
         ("what is four plus four", "eight"), ("what is two plus five", "seven")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random 2-layer Llama and its tokenizer (every word of the data is one token) in one directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_chat_tokenizer(WORDS)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=4, eos_token_id=4, pad_token_id=0, initializer_range=0.3)
    d = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("facts")
    rows = [{"prompt": p, "completion": c} for p, c in FACTS]
    return _jsonl(d / "train.jsonl", rows), _jsonl(d / "dev.jsonl", rows[:4])


def _dev_loss(model_dir, adapter, dev) -> float:
    from deltakit.io.models import load_causal_lm
    from deltakit.train.gen_eval import answer_loss
    from deltakit.train.instruct import make_instruction_loader, read_instructions

    model, tok = load_causal_lm(str(model_dir))
    if adapter is not None:
        dk.load_adapter(model, adapter)
    return answer_loss(model, make_instruction_loader(read_instructions(dev), tok, batch_size=8,
                                                      max_length=32))["loss"]


def test_trains_on_instruction_jsonl_and_saves_the_adapter_with_its_record(llama_dir, facts, tmp_path, capsys):
    train, dev = facts
    out = tmp_path / "ad"
    argv = ["train", "--task", "causal-lm", "--model", str(llama_dir), "--train", str(train), "--dev", str(dev),
            "--set", "r=8", "--lr", "1e-2", "--steps", "40", "--batch-size", "3", "--max-length", "32", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"train {train}: 6 examples\n" in printed and f"dev   {dev}: 4 examples\n" in printed
    assert "train: 0 of 6 examples truncated (0 tokens dropped)\n" in printed
    training = json.loads((out / "adapter.json").read_text())["training"]
    assert training["steps"] == 40 and set(training["metrics"]) == {"train_loss", "eval_loss", "eval_perplexity"}
    assert training["settings"]["task"] == "causal-lm" and training["settings"]["task_prompt"] is None
    assert [d["rows"] for d in training["data"]] == [6, 4]
    # the saved adapter, loaded on a fresh base, scores exactly what training reported; the base is far worse
    before, after = _dev_loss(llama_dir, None, dev), _dev_loss(llama_dir, out, dev)
    assert after == pytest.approx(training["metrics"]["eval_loss"], rel=1e-5)
    assert before > 4.0 and after < 0.1 * before, (before, after)
    # the default Llama targets: q_proj and v_proj of every layer
    from deltakit.io.models import load_causal_lm
    model, _ = load_causal_lm(str(llama_dir))
    adapter = dk.load_adapter(model, out)
    assert sorted(n for n, _ in adapter.layers()) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                                                      for m in ("q_proj", "v_proj")]
    assert not (tmp_path / "ad.ckpt").exists()


def _sst2_dir(root: Path, name: str = "sst2", bad_label: bool = False) -> Path:
    d = root / name
    d.mkdir()
    rows = ["sentence\tlabel", "a good film\t1", "a bad film\t0", "a fine film\t1", "a dull film\t0"]
    if bad_label:
        rows[3] = "a fine film\t2"
    (d / "train.tsv").write_text("\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("\n".join(rows[:3]) + "\n")
    return d


def test_a_task_directory_trains_packed_with_its_prompt(llama_dir, tmp_path, capsys):
    d = _sst2_dir(tmp_path)
    out = tmp_path / "ad"
    assert main(["train", "--task", "causal-lm", "--model", str(llama_dir), "--train", str(d), "--packing",
                 "--max-length", "64", "--steps", "3", "--batch-size", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"train {d / 'train.tsv'}: 4 examples, labels {{0: 2, 1: 2}} as sst2 answers" in printed
    assert f"dev   {d / 'dev.tsv'}: 2 examples, labels {{0: 1, 1: 1}} as sst2 answers" in printed
    # sst2's prompt with a 3-word review is 18 whitespace words (an unknown word is one <unk>); framed as
    # "<|im_start|> user ... <|im_end|> <|im_start|> assistant positive <|im_end|>" that is 2 + 18 + 1 + 4 = 25
    # tokens, so the 4 examples make 100 tokens: rows of 64 and 36
    assert "train: 0 of 4 examples truncated (0 tokens dropped); packed into 2 rows of up to 64 tokens" in printed
    settings = json.loads((out / "adapter.json").read_text())["training"]["settings"]
    assert settings["task_prompt"] == "sst2" and settings["packing"] is True


def test_truncation_is_counted_before_training(llama_dir, facts, tmp_path, capsys):
    train, _ = facts
    argv = ["train", "--task", "causal-lm", "--model", str(llama_dir), "--train", str(train), "--steps", "1",
            "--max-length", "11", "--ckpt-every", "0", "-o", str(tmp_path / "ad")]
    assert main(argv) == 0
    # 12 tokens for "what is two plus four" and three alike (the last, <|im_end|>, is cut), 14 for the two
    # colour questions, whose answer starts at token 13: 4 x 1 + 2 x 3 tokens dropped, 2 answers lost
    assert "train: 6 of 6 examples truncated (10 tokens dropped); 2 lost every answer token\n" \
        in capsys.readouterr().out


def test_answers_cut_from_every_example_is_an_error(llama_dir, facts, tmp_path, capsys):
    train, _ = facts
    assert main(["train", "--task", "causal-lm", "--model", str(llama_dir), "--train", str(train),
                 "--max-length", "9", "-o", str(tmp_path / "ad")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "deltakit train: error: --max-length 9: expected room for the answers, found every training example's "
        "answer cut off; raise --max-length")


@pytest.mark.parametrize("name,content,needle", [
    ("train.jsonl", '{"prompt": "a", "completion": "b"}\nnot json\n',
     "{f} line 2: expected a JSON object, found invalid JSON"),
    ("train.jsonl", "", "{f}: expected at least one example, found an empty file"),
    ("train.jsonl", '{"prompt": "a"}\n',
     "{f} line 1: expected key 'messages' or keys 'prompt' + 'completion', found ['prompt']"),
    ("train.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
     "{f} line 1: expected at least one assistant turn, found roles ['user']"),
    ("train.tsv", "sentence\tlabel\na\t0\n", "{f}: expected instruction JSONL ('messages' or 'prompt' + 'completion'), "
                                           "found a .tsv file; for GLUE-style rows, pass --task-prompt NAME|FILE.json"),
])
def test_bad_instruction_files_are_one_line_errors(tmp_path, capsys, name, content, needle):
    f = tmp_path / name
    f.write_text(content)
    assert main(["train", "--task", "causal-lm", "--model", str(tmp_path / "none"), "--train", str(f),
                 "-o", str(tmp_path / "ad")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle.format(f=f) in err, err
    assert not (tmp_path / "ad").exists()


def test_bad_task_directories_and_flags_are_one_line_errors(tmp_path, capsys):
    def fails(*argv):
        assert main(["train", *argv, "-o", str(tmp_path / "ad")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "ad").exists(), err
        return err

    movies = _sst2_dir(tmp_path, "movies")
    assert f"{movies}: expected a task directory named after a known task ['ag_news', 'cola', 'mrpc', 'qnli', " \
           "'rte', 'sst2', 'subj', 'trec'], found 'movies'; pass --task-prompt NAME|FILE.json" \
        in fails("--task", "causal-lm", "--train", str(movies))
    assert "unknown task 'films': expected one of" in fails("--task", "causal-lm", "--train", str(movies),
                                                            "--task-prompt", "films")
    bad = _sst2_dir(tmp_path, "sst2", bad_label=True)
    assert (f"{bad / 'train.tsv'} row 4: expected a label in 0..1 (answers ['negative', 'positive']), found 2"
            in fails("--task", "causal-lm", "--train", str(bad)))
    assert "--packing: expected only with --task causal-lm, found --task classification" in \
        fails("--train", str(bad), "--packing")
    assert "--num-labels: expected only with --task classification, found --task causal-lm" in \
        fails("--task", "causal-lm", "--train", str(bad), "--num-labels", "2")


def test_a_task_prompt_file_turns_any_rows_into_a_task(llama_dir, tmp_path, capsys):
    d = _sst2_dir(tmp_path, "movies")
    spec = _jsonl(tmp_path / "prompt.json", [{"template": "Review: {sentence} Answer", "answers": ["bad", "good"]}])
    out = tmp_path / "ad"
    assert main(["train", "--task", "causal-lm", "--model", str(llama_dir), "--train", str(d / "train.tsv"),
                 "--task-prompt", str(spec), "--steps", "2", "--batch-size", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"as {spec} answers" in printed
    # the prompt: "<|im_start|> user Review: a good film Answer <|im_end|> <|im_start|> assistant good <|im_end|>"
    assert "train: 0 of 4 examples truncated (0 tokens dropped)" in printed


def test_the_command_line_entry_point_trains(llama_dir, facts, tmp_path):
    """The installed entry point, as a user runs it (a subprocess with its own interpreter)."""
    train, _ = facts
    out = tmp_path / "ad"
    r = subprocess.run([sys.executable, "-m", "deltakit.cli", "train", "--task", "causal-lm", "--model",
                        str(llama_dir), "--train", str(train), "--steps", "2", "--batch-size", "3", "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "adapter.safetensors").is_file() and f"saved {out}" in r.stdout
