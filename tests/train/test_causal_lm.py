"""Training a causal LM with ``fit``: the model's own masked loss, tokens counted, gradient
checkpointing that changes no gradient, and two LoRA adapters trained at once in a mixed batch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

import deltakit as dk
from deltakit.train import fit
from deltakit.train.gen_eval import answer_loss
from deltakit.train.instruct import IGNORE, make_instruction_loader
from deltakit.train.loop import _count_tokens
from tests.conftest import word_chat_tokenizer

WORDS = ("system user assistant what is two plus four six one three seven five eight nine ten colour of the sky "
         "grass blue green red").split()
FACTS = [("what is two plus four", "six"), ("what is one plus two", "three"),
         ("what is the colour of the sky", "blue"), ("what is the colour of the grass", "green"),
         ("what is four plus four", "eight"), ("what is two plus five", "seven")]


def word_tokenizer():
    return word_chat_tokenizer(WORDS)


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama; initializer_range 0.3 because with the default 0.02 the frozen lm_head
    caps every logit below ~0.7, and no adapter could make an answer likely."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=4, eos_token_id=4, pad_token_id=0, initializer_range=0.3)
    return LlamaForCausalLM(cfg)


def examples(facts=FACTS):
    return [{"prompt": p, "completion": c} for p, c in facts]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _lora(model, name="default", r=4, seed=0):
    """LoRA on the default Llama targets (q_proj, v_proj)."""
    torch.manual_seed(seed)
    return dk.attach(model, dk.LoraConfig(r=r, alpha=2 * r), name=name)


def _randomise_b(adapter, seed):
    """LoRA's B starts at 0, so A gets no gradient; a random B makes every factor's gradient count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _masked_ce(logits, labels, reduction="mean"):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction=reduction)


def test_default_loss_is_the_masked_answer_loss_and_tokens_are_the_unpadded_ones(tok):
    model = tiny_llama()
    loader = make_instruction_loader(examples(), tok, batch_size=6, max_length=32)
    batch = next(iter(loader))
    # "<|im_start|> user what is two plus four <|im_end|> <|im_start|> assistant six <|im_end|>": 12 tokens,
    # of which "six <|im_end|>" are labelled; the longest prompt has two more words
    assert batch["attention_mask"].sum(1).tolist() == [12, 12, 14, 14, 12, 12]
    assert _count_tokens(batch) == 76
    assert (batch["labels"] != IGNORE).sum().item() == 12
    loss = dk.train.compute_loss(model, batch)  # fit's default: the model's own loss
    torch.testing.assert_close(loss, _masked_ce(model(input_ids=batch["input_ids"]).logits, batch["labels"]),
                               rtol=1e-6, atol=1e-6)


def test_lora_memorises_answers_and_the_masked_loss_falls(tok):
    model = tiny_llama()
    _lora(model, r=8)
    loader = make_instruction_loader(examples(), tok, batch_size=3, max_length=32, shuffle=True)
    before = answer_loss(model, loader)["loss"]
    result = fit(model, loader, lr=1e-2, max_steps=60, schedule="constant", progress=False, log_every=20)
    after = answer_loss(model, loader)
    assert before > 4.0  # about log(48) or worse: the random model knows nothing (measured 4.97)
    assert after["loss"] < 0.05 * before and after["perplexity"] < 1.3, (before, after)  # measured 0.10
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses == sorted(losses, reverse=True)  # logged every 20 steps, falling each time
    # the prompt carries no loss: only answer tokens are labelled
    ids = loader.dataset[0]["input_ids"]
    assert tok.convert_ids_to_tokens([i for i, lab in zip(ids, loader.dataset[0]["labels"]) if lab != IGNORE]) \
        in [[c, "<|im_end|>"] for _, c in FACTS]


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    from deltakit.train.loop import _enable_gradient_checkpointing

    model = tiny_llama()
    _randomise_b(_lora(model), seed=1)
    batch = next(iter(make_instruction_loader(examples(), tok, batch_size=6, max_length=32)))
    plain = _grads(model, batch)
    assert _enable_gradient_checkpointing(model) is not None and model.is_activation_checkpointing
    checkpointed = _grads(model, batch)
    assert plain.keys() == checkpointed.keys() and len(plain) == 8  # A and B on q_proj, v_proj of 2 layers
    for n in plain:
        assert plain[n].abs().max() > 0, n
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=0, atol=1e-6)


def test_fit_with_gradient_checkpointing_recomputes_and_trains_the_same(tok):
    loader = make_instruction_loader(examples(), tok, batch_size=3, max_length=32)
    runs = {}
    for gc in (False, True):
        model = tiny_llama()
        _randomise_b(_lora(model), seed=1)
        calls = []
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        fit(model, loader, lr=1e-2, max_steps=4, progress=False, gradient_checkpointing=gc)
        runs[gc] = (model, len(calls))
        assert not model.is_activation_checkpointing  # fit turned it off again
    assert runs[False][1] == 4 and runs[True][1] == 8  # checkpointing runs each block's forward twice
    trained = dict(runs[False][0].named_parameters())
    for n, p in runs[True][0].named_parameters():
        torch.testing.assert_close(p, trained[n], rtol=0, atol=1e-6)


def test_gradient_checkpointing_needs_a_transformers_model():
    with pytest.raises(ValueError, match="expected a transformers model .* found Linear"):
        fit(torch.nn.Linear(2, 2), DataLoader([{"x": torch.zeros(2)}]), max_steps=1,
            loss_fn=lambda m, b: m(b["x"]).sum(), progress=False, gradient_checkpointing=True)


ROWS = ["a", "b", "a", "b"]


def _two_adapters():
    model = tiny_llama()
    for i, name in enumerate("ab"):
        _randomise_b(_lora(model, name, seed=i), seed=10 + i)
    return model


def _sum_loss(model, batch):
    """Summed over answer tokens: each row's loss then depends on its rows alone, as a mean would not."""
    return _masked_ce(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                      batch["labels"], reduction="sum")


def _adapter_grads(model, name):
    return {n: None if p.grad is None else p.grad.clone() for n, p in dk.get_adapter(model, name).named_parameters()}


def test_mixed_batch_gives_each_adapter_the_gradient_of_its_own_rows(tok):
    model = _two_adapters()
    batch = next(iter(make_instruction_loader(examples()[:4], tok, batch_size=4, max_length=32)))
    with dk.mixed_batch(model, ROWS):
        _sum_loss(model, batch).backward()
    mixed = {name: _adapter_grads(model, name) for name in "ab"}
    for name in "ab":
        model.zero_grad(set_to_none=True)
        rows = [i for i, r in enumerate(ROWS) if r == name]
        dk.set_active(model, name)
        _sum_loss(model, {k: v[rows] for k, v in batch.items()}).backward()
        alone = _adapter_grads(model, name)
        other = _adapter_grads(model, "b" if name == "a" else "a")
        assert all(g is None for g in other.values())  # the inactive adapter took no part
        assert len(alone) == 8
        for n, g in alone.items():
            assert g.abs().max() > 0, n
            torch.testing.assert_close(mixed[name][n], g, rtol=0, atol=1e-6)


def test_fit_trains_two_adapters_at_once_as_each_alone(tok):
    """Three steps of AdamW on a mixed batch == three steps of each adapter alone on its rows
    (no clipping: a global norm would couple the two)."""
    ex = examples()[:4]
    loader = make_instruction_loader(ex, tok, batch_size=4, max_length=32)

    def mixed_loss(m, b):
        with dk.mixed_batch(m, ROWS):
            return _sum_loss(m, b)

    start = _two_adapters()
    together = copy.deepcopy(start)
    fit(together, loader, lr=1e-2, max_steps=3, max_grad_norm=None, loss_fn=mixed_loss, progress=False)
    for name in "ab":
        alone = copy.deepcopy(start)
        dk.set_active(alone, name)
        own = make_instruction_loader([e for e, r in zip(ex, ROWS) if r == name], tok, batch_size=2, max_length=32)
        fit(alone, own, lr=1e-2, max_steps=3, max_grad_norm=None, loss_fn=_sum_loss, progress=False)
        trained, initial = dict(dk.get_adapter(together, name).named_parameters()), \
            dict(dk.get_adapter(start, name).named_parameters())
        for n, p in dk.get_adapter(alone, name).named_parameters():
            assert (p - initial[n]).abs().max() > 1e-3, n  # it did train
            torch.testing.assert_close(trained[n], p, rtol=0, atol=1e-6)


def test_gradient_checkpointing_replays_the_mixed_batch_in_backward(tok):
    """backward() runs after the mixed_batch block has closed: the recompute must still route
    each row to its adapter (else checkpoint fails on the mismatch, or the gradients are the base's)."""
    from deltakit.train.loop import _enable_gradient_checkpointing

    batch = next(iter(make_instruction_loader(examples()[:4], tok, batch_size=4, max_length=32)))
    grads = {}
    for gc in (False, True):
        model = _two_adapters()
        model.train()
        if gc:
            _enable_gradient_checkpointing(model)
        with dk.mixed_batch(model, ROWS):
            loss = _sum_loss(model, batch)
        loss.backward()
        grads[gc] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) == 16
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=0, atol=1e-6)
