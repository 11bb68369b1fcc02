"""Evaluation of generative models: exact match, label accuracy by generation, perplexity.

* :func:`exact_match` - the share of outputs equal to their reference after :func:`normalize`
  (surrounding whitespace and trailing punctuation dropped, inner whitespace collapsed,
  case folded), so ``"Positive."`` matches ``"positive"``.
* :func:`answer_label` - a generated text mapped to a label of a :class:`~deltakit.train.instruct.TaskPrompt`:
  the answer word the text *starts with* (its first word, case-insensitive, punctuation
  ignored); failing that, the answer word that occurs *first* in the text as a whole word
  (so ``"The answer is yes."`` is ``yes``); failing that, None, which counts as wrong.
* :func:`perplexity` - ``exp`` of the token-weighted mean negative log-likelihood over the
  labelled tokens of a held-out loader (``labels`` aligned with ``input_ids``, ``-100`` ignored,
  shifted by one as causal LMs predict the next token). With instruction data
  (:func:`~deltakit.train.instruct.make_instruction_loader`) only assistant tokens are labelled,
  so it is the perplexity of the answers given the prompts. Token-weighted: every labelled token
  counts once, whatever its batch (not a mean of per-batch means).

>>> answer_label("Positive, clearly.", ("negative", "positive"))
1
>>> answer_label("I think the answer is no", ("yes", "no"))
1
>>> exact_match(["Paris.", "rome"], ["paris", "Madrid"])
0.5
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .generate import generate
from .instruct import IGNORE, TASKS, TaskPrompt, to_messages

__all__ = ["normalize", "exact_match", "answer_label", "label_accuracy", "perplexity", "answer_loss",
           "evaluate_generation"]


def normalize(text: str) -> str:
    """Case-folded, inner whitespace collapsed, surrounding whitespace and trailing ``.!?,;:`` dropped."""
    return " ".join(text.split()).rstrip(".!?,;:").strip().casefold()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize`."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"expected as many predictions as references (at least one), found "
                         f"{len(predictions)} and {len(references)}")
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(predictions)


def answer_label(text: str, answers: Sequence[str]) -> int | None:
    """The label whose answer word ``text`` starts with, else the one it mentions first, else None."""
    words = re.findall(r"\w+", text.casefold())
    folded = [a.casefold() for a in answers]
    if words and words[0] in folded:
        return folded.index(words[0])
    first: tuple[int, int] | None = None   # (position in text, label)
    for k, a in enumerate(folded):
        m = re.search(rf"\b{re.escape(a)}\b", text.casefold())
        if m and (first is None or m.start() < first[0]):
            first = (m.start(), k)
    return None if first is None else first[1]


def label_accuracy(texts: Sequence[str], labels: Sequence[int], answers: Sequence[str]) -> dict[str, Any]:
    """``{"accuracy", "unmapped", "predictions"}``: unmapped outputs (no answer word) count as wrong."""
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"expected as many outputs as labels (at least one), found {len(texts)} and {len(labels)}")
    preds = [answer_label(t, answers) for t in texts]
    right = sum(p == int(y) for p, y in zip(preds, labels))
    return {"accuracy": right / len(texts), "unmapped": sum(p is None for p in preds), "predictions": preds}


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"nll", "perplexity", "tokens"}`` over the labelled tokens of ``batches``.

    Each batch has ``input_ids`` and ``labels`` (B, T) and optionally ``attention_mask``;
    ``labels[:, t]`` is the token position ``t`` should hold, so logits at ``t - 1`` score it.
    """
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a DataLoader draws from the global RNG
            for b in batches:
                labels = b["labels"].to(device)
                kw = {"attention_mask": b["attention_mask"].to(device)} if "attention_mask" in b else {}
                logits = model(input_ids=b["input_ids"].to(device), **kw).logits[:, :-1].float()
                target = labels[:, 1:]
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 target.reshape(-1), ignore_index=IGNORE,
                                                                 reduction="sum"))
                count += int((target != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("expected labelled tokens (labels other than -100) to score, found none")
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count}


def answer_loss(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"loss", "perplexity"}`` on the labelled (answer) tokens of ``loader``, weighted per token
    (averaging batch means would over-weight short answers): :func:`perplexity` as fit's eval_fn."""
    r = perplexity(model, loader)
    return {"loss": r["nll"], "perplexity": r["perplexity"]}


def evaluate_generation(model: nn.Module, tokenizer: Any, examples: Sequence[Mapping[str, Any]], *,
                        task: str | TaskPrompt | None = None, adapters: str | Sequence[str | None] | None = None,
                        max_new_tokens: int = 8, batch_size: int = 8, routing=None) -> dict[str, Any]:
    """Greedy answers to instruction examples, scored against their last assistant turn.

    Returns ``{"exact_match", "outputs"}`` plus, when ``task`` is given and the examples carry
    ``label`` (as :func:`~deltakit.train.instruct.task_examples` makes them), ``accuracy`` and
    ``unmapped`` (see :func:`label_accuracy`). ``adapters`` / ``routing``: as in
    :func:`~deltakit.train.generate.generate`.
    """
    prompts, refs = [], []
    for i, ex in enumerate(examples):
        msgs = to_messages(ex, f"example {i}")
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        prompts.append(msgs[:last])
        refs.append(msgs[last]["content"])
    outs = generate(model, tokenizer, prompts, adapters=adapters, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, routing=routing)
    result: dict[str, Any] = {"exact_match": exact_match(outs, refs), "outputs": outs}
    if task is not None:
        spec = TASKS[task] if isinstance(task, str) else task
        labels = [int(ex["label"]) for ex in examples]
        scored = label_accuracy(outs, labels, spec.answers)
        result.update(accuracy=scored["accuracy"], unmapped=scored["unmapped"])
    return result
