"""Instruction / chat data for generative models: read, format, mask, pack.

An *example* is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
with at least one assistant turn. JSONL files hold either that, or
``{"prompt": ..., "completion": ...}`` (one user turn, one assistant turn); Hugging Face
``datasets`` objects with either shape work the same.

Formatting goes through the tokenizer's chat template, and the loss is on assistant
tokens only: for each assistant turn, the tokens that the turn adds to the rendered
conversation (its content and end-of-turn marker) are labelled, everything else is
``-100``. That needs a template that renders a conversation's prefix as a prefix of the
whole; one that does not is refused rather than mis-masked. A tokenizer without a chat
template gets a plain ``User: ... / Assistant: ...`` format ending with EOS.

Truncation at ``max_length`` is counted and reported, never silent; ``packing=True``
concatenates examples into full rows of ``max_length`` tokens (no attention masking
across examples, as TRL's packing without position resets).

GLUE-style classification rows turn into instruction examples with :func:`task_examples`:
one prompt per task, the answer a word ("positive" / "negative"), so every text task in
``shared/data/text`` is also a generative task, scored by mapping answers back to labels.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from deltakit.train.data import json_lines, DataFormatError, _subsample

__all__ = ["read_instructions", "examples_from_dataset", "to_messages", "TASKS", "TaskPrompt",
           "task_examples", "task_prompt", "read_task_file", "encode_example", "InstructionDataset",
           "make_instruction_loader", "IGNORE"]

IGNORE = -100
Example = dict[str, Any]
_ROLES = ("system", "user", "assistant")


def to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    """An example's messages, checked: ``messages`` or ``prompt`` + ``completion``."""
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataFormatError(f"{where}: expected 'messages' to be a non-empty list, found {msgs!r:.60}")
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataFormatError(f"{where}: message {i}: expected {{'role': one of {list(_ROLES)}, "
                                      f"'content': str}}, found {m!r:.80}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataFormatError(f"{where}: expected at least one assistant turn, found roles "
                                  f"{[m['role'] for m in msgs]}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in obj and "completion" in obj:
        p, c = obj["prompt"], obj["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise DataFormatError(f"{where}: expected text 'prompt' and 'completion', found "
                                  f"{type(p).__name__} and {type(c).__name__}")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    raise DataFormatError(f"{where}: expected key 'messages' or keys 'prompt' + 'completion', found {sorted(obj)}")


def read_instructions(path: str | os.PathLike, *, max_rows: int | None = None, seed: int = 0) -> list[Example]:
    """Examples from a JSONL file; any bad line is a one-line error naming file and line.
    ``max_rows``: keep a seeded random subset of this size (in file order), after checking every line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: expected a JSONL file, found nothing")
    out = [{"messages": to_messages(obj, f"{path} line {n}")} for n, obj in json_lines(path)]
    if not out:
        raise DataFormatError(f"{path}: expected at least one example, found an empty file")
    return _subsample(out, max_rows, seed)


def examples_from_dataset(ds: Any) -> list[Example]:
    """Examples from a ``datasets.Dataset`` (or any sequence of dicts) of either shape."""
    rows = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    if not rows:
        raise DataFormatError(f"{type(ds).__name__}: expected at least one example, found none")
    return [{"messages": to_messages(r, f"{type(ds).__name__} row {i}")} for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------- classification tasks
@dataclass(frozen=True)
class TaskPrompt:
    """How a classification task reads as an instruction: a template over the row's texts, and
    one answer word per label (index = label)."""

    template: str
    answers: tuple[str, ...]


TASKS: dict[str, TaskPrompt] = {
    "sst2": TaskPrompt("Is the sentiment of this movie review positive or negative?\nReview: {sentence}\n"
                       "Answer with one word.", ("negative", "positive")),
    "cola": TaskPrompt("Is this sentence grammatically acceptable? Answer yes or no.\nSentence: {sentence}",
                       ("no", "yes")),
    "mrpc": TaskPrompt("Do these two sentences mean the same thing? Answer yes or no.\n"
                       "Sentence 1: {sentence1}\nSentence 2: {sentence2}", ("no", "yes")),
    "rte": TaskPrompt("Does the first sentence imply the second? Answer yes or no.\n"
                      "Sentence 1: {sentence1}\nSentence 2: {sentence2}", ("yes", "no")),
    "qnli": TaskPrompt("Does the sentence answer the question? Answer yes or no.\n"
                       "Question: {sentence1}\nSentence: {sentence2}", ("yes", "no")),
    "subj": TaskPrompt("Is this sentence subjective or objective? Answer with one word.\nSentence: {sentence}",
                       ("subjective", "objective")),
    "trec": TaskPrompt("What kind of answer does this question ask for? Answer with one word: abbreviation, "
                       "entity, description, human, location or number.\nQuestion: {sentence}",
                       ("abbreviation", "entity", "description", "human", "location", "number")),
    "ag_news": TaskPrompt("What is the topic of this news article? Answer with one word: world, sports, "
                          "business or technology.\nArticle: {sentence}",
                          ("world", "sports", "business", "technology")),
}


def task_examples(rows: Sequence[Mapping[str, Any]], task: str | TaskPrompt) -> list[Example]:
    """GLUE-style rows (``sentence`` or ``sentence1``/``sentence2``, ``label``) as instruction
    examples whose assistant turn is the label's answer word."""
    spec = TASKS[task] if isinstance(task, str) else task
    out = []
    for i, r in enumerate(rows):
        label = int(r["label"])
        if not 0 <= label < len(spec.answers):
            raise DataFormatError(f"row {i}: expected a label in 0..{len(spec.answers) - 1}, found {label}")
        out.append({"messages": [{"role": "user", "content": spec.template.format(**r)},
                                 {"role": "assistant", "content": spec.answers[label]}], "label": label})
    return out


def task_prompt(name_or_file: str | os.PathLike) -> TaskPrompt:
    """A task's prompt by name (a key of :data:`TASKS`), or from a JSON file
    ``{"template": "... {sentence} ...", "answers": ["negative", "positive"]}``."""
    name = str(name_or_file)
    if name in TASKS:
        return TASKS[name]
    path = Path(name)
    if not path.is_file():
        raise DataFormatError(f"unknown task {name!r}: expected one of {sorted(TASKS)} or a JSON file with "
                              "'template' and 'answers'")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: expected a JSON object with 'template' and 'answers', found invalid JSON "
                              f"({e})") from None
    if (not isinstance(obj, dict) or not isinstance(obj.get("template"), str)
            or not isinstance(obj.get("answers"), list) or len(obj["answers"]) < 2
            or not all(isinstance(a, str) and a for a in obj["answers"])):
        raise DataFormatError(f"{path}: expected {{'template': str, 'answers': [two or more words]}}, "
                              f"found {obj!r:.80}")
    return TaskPrompt(obj["template"], tuple(obj["answers"]))


def read_task_file(path: str | os.PathLike, task: str | TaskPrompt, *, max_rows: int | None = None,
                   seed: int = 0) -> list[Example]:
    """A GLUE-style file (see :func:`deltakit.train.data.read_rows`) as instruction examples.

    Every row is checked before subsampling, so a label without an answer word is a one-line
    error naming the file and the row's line (as ``read_rows`` numbers them).
    """
    from deltakit.train.data import read_rows

    spec = task_prompt(task) if isinstance(task, str) else task
    rows = read_rows(path, max_rows=None)
    line0 = 1 if Path(path).suffix == ".jsonl" else 2
    for i, r in enumerate(rows):
        if r["label"] >= len(spec.answers):
            raise DataFormatError(f"{path} row {i + line0}: expected a label in 0..{len(spec.answers) - 1} "
                                  f"(answers {list(spec.answers)}), found {r['label']}")
        try:
            spec.template.format(**r)
        except (KeyError, IndexError) as e:
            raise DataFormatError(f"{path} row {i + line0}: the task template needs field {e}, found columns "
                                  f"{sorted(r)}") from None
    return task_examples(_subsample(rows, max_rows, seed), spec)


# ----------------------------------------------------------------------------- tokenising and masking
def _render(tok: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    ids = tok(text + ("Assistant:" if generation_prompt else ""), add_special_tokens=False)["input_ids"]
    if not generation_prompt and messages[-1]["role"] == "assistant" and tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return list(ids)


def encode_example(tok: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a whole conversation; labels are ``IGNORE`` except on the tokens
    each assistant turn adds (its content and end-of-turn marker)."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tok, messages[:i], generation_prompt=True)
        full = _render(tok, messages[: i + 1], generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise DataFormatError("the tokenizer's chat template renders earlier turns differently once a turn "
                                  "is added, so assistant tokens cannot be masked per turn")
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt):]
        ids = full
    tail = _render(tok, messages, generation_prompt=False)
    labels += [IGNORE] * (len(tail) - len(ids))  # turns after the last assistant reply
    return tail, labels


@dataclass
class TruncationReport:
    examples: int = 0
    truncated: int = 0
    tokens_dropped: int = 0
    no_target_left: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.truncated} of {self.examples} examples truncated ({self.tokens_dropped} tokens dropped)"
                + (f"; {len(self.no_target_left)} lost every answer token" if self.no_target_left else ""))


class InstructionDataset(Dataset):
    """Examples tokenised once: items are ``input_ids`` / ``labels`` lists, truncated to
    ``max_length`` (counted in :attr:`report`), or packed into rows of exactly ``max_length``."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int = 512, packing: bool = False):
        if max_length < 2:
            raise ValueError(f"expected max_length >= 2, found {max_length}")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.report = TruncationReport()
        items = [self._encode(tokenizer, ex, max_length, packing, n) for n, ex in enumerate(examples)]
        self.items = _pack(items, max_length) if packing else items

    def _encode(self, tok, ex: Example, max_length: int, packing: bool, n: int) -> tuple[list[int], list[int]]:
        ids, labels = encode_example(tok, to_messages(ex, f"example {n}"))
        self.report.examples += 1
        if len(ids) > max_length and not packing:
            self.report.truncated += 1
            self.report.tokens_dropped += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE for x in labels):
                self.report.no_target_left.append(n)
        return ids, labels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}

    def collate(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded tensors (B, T): ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on padding)."""
        width = max(len(b["input_ids"]) for b in batch)
        pad = [width - len(b["input_ids"]) for b in batch]
        return {
            "input_ids": torch.tensor([b["input_ids"] + [self.pad_id] * p for b, p in zip(batch, pad)]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * p for b, p in zip(batch, pad)]),
            "labels": torch.tensor([b["labels"] + [IGNORE] * p for b, p in zip(batch, pad)]),
        }


def _pack(items: list[tuple[list[int], list[int]]], width: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate every example and cut rows of ``width`` tokens (the last, shorter row kept)."""
    ids = [t for i, _ in items for t in i]
    labels = [t for _, lab in items for t in lab]
    return [(ids[s:s + width], labels[s:s + width]) for s in range(0, len(ids), width)]


def make_instruction_loader(examples: Sequence[Example], tokenizer: Any, *, batch_size: int = 8,
                            max_length: int = 512, packing: bool = False, shuffle: bool = False,
                            seed: int = 0) -> DataLoader:
    """A DataLoader over :class:`InstructionDataset`; its ``dataset.report`` says what was truncated."""
    ds = InstructionDataset(examples, tokenizer, max_length=max_length, packing=packing)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=ds.collate,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)
