"""Instruction / chat data: chat-template formatting, assistant-only loss mask, packing, errors."""
from __future__ import annotations

import json

import pytest
import torch

from deltakit.train.data import DataFormatError
from deltakit.train.instruct import (IGNORE, TASKS, InstructionDataset, encode_example, make_instruction_loader,
                                     read_instructions, task_examples, to_messages)
from tests.conftest import word_chat_tokenizer

WORDS = ("system user assistant you are terse hi hello there how old are seven years what is two plus "
         "four six thanks bye ok").split()


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer with ChatML markers as single tokens: every id is a known word."""
    return word_chat_tokenizer(WORDS)


CONV = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "hi how old are you"},
        {"role": "assistant", "content": "seven years"}, {"role": "user", "content": "what is two plus four"},
        {"role": "assistant", "content": "six"}, {"role": "user", "content": "thanks bye"}]


def test_loss_is_on_assistant_tokens_only_token_by_token(tok):
    ids, labels = encode_example(tok, CONV)
    words = tok.convert_ids_to_tokens(ids)
    assert " ".join(words) == ("<|im_start|> system you are terse <|im_end|> <|im_start|> user hi how old are you "
                               "<|im_end|> <|im_start|> assistant seven years <|im_end|> <|im_start|> user what is "
                               "two plus four <|im_end|> <|im_start|> assistant six <|im_end|> <|im_start|> user "
                               "thanks bye <|im_end|>")
    trained = [w if lab != IGNORE else "-" for w, lab in zip(words, labels)]
    assert [w for w in trained if w != "-"] == ["seven", "years", "<|im_end|>", "six", "<|im_end|>"]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels)) and len(labels) == len(ids)
    # the answer starts right after the generation prompt "<|im_start|> assistant"
    first = labels.index(next(x for x in labels if x != IGNORE))
    assert words[first - 2:first] == ["<|im_start|>", "assistant"]


def test_prompt_completion_is_one_user_and_one_assistant_turn(tok):
    msgs = to_messages({"prompt": "what is two plus four", "completion": "six"}, "x")
    assert msgs == [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"}]
    ids, labels = encode_example(tok, msgs)
    assert tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE]) == ["six", "<|im_end|>"]


def test_without_a_chat_template_the_answer_ends_with_eos(tok):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
                          eos_token="</s>")
    plain.chat_template = None
    ids, labels = encode_example(plain, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert labels[-1] == plain.eos_token_id and IGNORE in labels


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    import copy
    t = copy.deepcopy(tok)
    # marks the last turn, so adding a turn re-renders the one before it
    t.chat_template = "{% for m in messages %}{% if loop.last %}hello {% endif %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(DataFormatError, match="renders earlier turns differently"):
        encode_example(t, CONV)


def test_truncation_is_counted_and_reported(tok):
    ds = InstructionDataset([{"messages": CONV}, {"prompt": "hi", "completion": "hello"}], tok, max_length=12)
    assert ds.report.examples == 2 and ds.report.truncated == 1
    assert ds.report.tokens_dropped == len(encode_example(tok, CONV)[0]) - 12
    assert ds.report.no_target_left == [0] and "lost every answer token" in str(ds.report)
    assert all(len(it["input_ids"]) <= 12 for it in ds)


def test_packing_fills_rows_and_keeps_every_token(tok):
    exs = [{"messages": CONV}] * 3 + [{"prompt": "hi", "completion": "hello"}]
    total = 3 * len(encode_example(tok, CONV)[0]) + len(encode_example(tok, to_messages(exs[-1], "x"))[0])
    ds = InstructionDataset(exs, tok, max_length=16, packing=True)
    lengths = [len(it["input_ids"]) for it in ds]
    assert sum(lengths) == total and all(n == 16 for n in lengths[:-1]) and ds.report.truncated == 0


def test_collate_pads_right_and_masks_padding(tok):
    loader = make_instruction_loader([{"messages": CONV}, {"prompt": "hi", "completion": "hello"}], tok,
                                     batch_size=2)
    b = next(iter(loader))
    short = int(b["attention_mask"][1].sum())
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert (b["labels"][1, short:] == IGNORE).all() and (b["input_ids"][1, short:] == tok.pad_token_id).all()
    assert b["attention_mask"][0].all()


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: expected at least one assistant turn"),
    ('{"prompt": "hi"}', "line 2: expected key 'messages' or keys 'prompt' \\+ 'completion'"),
    ("not json", "line 2: expected a JSON object, found invalid JSON"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2: message 0: expected"),
    ('[1, 2]', "line 2: expected a JSON object, found list"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=f"d.jsonl {message}"):
        read_instructions(f)


def test_empty_file_and_bom(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="e.jsonl: expected at least one example, found an empty file"):
        read_instructions(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "completion": "b"}).encode())
    assert read_instructions(tmp_path / "b.jsonl")[0]["messages"][1]["content"] == "b"


def test_classification_rows_become_instructions():
    rows = [{"sentence1": "A", "sentence2": "B", "label": 1}, {"sentence": "great film", "label": 1}]
    ex = task_examples(rows[:1], "mrpc")[0]
    assert ex["messages"][1] == {"role": "assistant", "content": "yes"} and "Sentence 2: B" in ex["messages"][0]["content"]
    assert task_examples(rows[1:], "sst2")[0]["messages"][1]["content"] == "positive"
    assert len(TASKS) == 8 and all(len(set(t.answers)) == len(t.answers) for t in TASKS.values())
    with pytest.raises(DataFormatError, match="expected a label in 0..1, found 5"):
        task_examples([{"sentence": "x", "label": 5}], "sst2")
