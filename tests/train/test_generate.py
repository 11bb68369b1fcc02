"""Generation: mixed-adapter rows equal each adapter alone and merged, batched equals one at a
time, our loop equals transformers' generate, seeded sampling reproduces, prompts match training."""
from __future__ import annotations

import math

import pytest
import torch

import deltakit as dk
from deltakit.core.layer import DeltaStateError
from deltakit.train.generate import encode_prompts, generate, generate_ids, sample_top_p
from deltakit.train.instruct import IGNORE, encode_example
from tests.conftest import make_model
from tests.train.test_instruct import tok  # noqa: F401  (the word-level chat tokenizer fixture)

NAMES = ("a", "b", "c")
PROMPTS = [[5, 9, 13, 40], [7, 8], [30, 31, 32, 33, 34, 35], [11], [50, 51, 52]]
ROWS = ["a", "b", None, "c", "a"]
NEW = 6


def _with_adapters(kind: str, method: str = "lora", **kw):
    """A tiny model with three adapters of random non-zero weights (each changes the output)."""
    model = make_model(kind)
    cfg = dk.get_method(method).config(**(kw or {"r": 4}))
    for i, n in enumerate(NAMES):
        ad = dk.attach(model, cfg, name=n)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _alone(model, name, prompts=PROMPTS, **kw):
    """Every prompt through ``name`` as the model's only adapter (None: the base)."""
    if name is None:
        with dk.disabled(model):
            return generate_ids(model, prompts, max_new_tokens=NEW, **kw)
    dk.set_active(model, name)
    return generate_ids(model, prompts, max_new_tokens=NEW, **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_rows_equal_each_adapter_alone_and_merged(kind):
    model = _with_adapters(kind)
    mixed = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW)
    assert all(len(r) == NEW for r in mixed)          # no EOS given: every row runs to the end
    alone = {n: _alone(model, n) for n in (*NAMES, None)}
    for i, name in enumerate(ROWS):
        assert mixed[i] == alone[name][i], (i, name)
    # the adapters really differ: otherwise the test above would prove nothing
    assert len({tuple(map(tuple, alone[n])) for n in alone}) == 4
    for name in NAMES:
        dk.set_active(model, name)
        ad = dk.get_adapter(model, name)
        ad.merge()
        merged = generate_ids(model, PROMPTS, max_new_tokens=NEW)
        ad.unmerge()
        assert merged == alone[name], name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_ranks_and_targets_equal_each_adapter_alone(kind, monkeypatch):
    """The mixed-adapter LoRA kernel at model level: ranks 4 / 8 / 16 (three rank groups, never
    padded to 16), one adapter on the first block only (absent from every later layer), rows
    sharing adapters and base rows; prefill gathers factors per row, decode packs per adapter."""
    from deltakit.methods import _mixed

    packed = []
    real = _mixed._padded
    monkeypatch.setattr(_mixed, "_padded", lambda *a: packed.append(1) or real(*a))
    model = make_model(kind)
    cfgs = {"a": {"r": 4}, "b": {"r": 8, "layers": (0,)}, "c": {"r": 16}, "d": {"r": 4}, "e": {"r": 16}}
    for i, (n, kw) in enumerate(cfgs.items()):
        ad = dk.attach(model, dk.LoraConfig(alpha=8.0, **kw), name=n)
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    rows = ["c", "b", None, "a", "e", "d", "a", "a", "c", "e", "d"]
    prompts = [*PROMPTS, [3, 4, 5], [60, 61], [9, 9, 9, 9], [20, 21, 22], [44], [45, 46, 47, 48, 49]]
    mixed = generate_ids(model, prompts, adapters=rows, max_new_tokens=NEW)
    assert packed                                        # decode steps took the packed form
    alone = {n: _alone(model, n, prompts) for n in (*cfgs, None)}
    for i, name in enumerate(rows):
        assert mixed[i] == alone[name][i], (i, name)
    assert len({tuple(map(tuple, alone[n])) for n in alone}) == 6


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_equals_one_at_a_time_greedy_and_sampled(kind):
    model = _with_adapters(kind)
    for kw in ({}, {"do_sample": True, "seed": 7, "temperature": 1.5, "top_p": 0.9}):
        batched = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW, batch_size=5, **kw)
        single = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW, batch_size=1, **kw)
        assert batched == single, kw


def test_one_adapter_name_for_every_row_equals_that_adapter_alone():
    model = _with_adapters("llama")
    dk.set_active(model, ["a", "b"])     # the model's own active set must not leak into the call
    assert generate_ids(model, PROMPTS, adapters="c", max_new_tokens=NEW) == _alone(model, "c")
    assert generate_ids(model, PROMPTS, adapters=[None] * 5, max_new_tokens=NEW) == _alone(model, None)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_equals_transformers_generate_under_mixed_batch(kind):
    model = _with_adapters(kind)
    ours = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW, batch_size=5,
                        eos_token_id=1, pad_token_id=2)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    with dk.mixed_batch(model, ROWS), torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=2, eos_token_id=1)[:, width:].tolist()
    assert ours == [r[:r.index(1)] if 1 in r else r for r in ref]


def test_stops_at_eos_and_drops_it():
    model = _with_adapters("gpt2")
    full = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW)
    stop = full[0][3]
    other = next(t for t in range(64) if t not in full[0])   # a second EOS id (several are allowed)
    cut = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW, eos_token_id=[other, stop])
    for f, c in zip(full, cut):
        end = min([f.index(t) for t in (other, stop) if t in f], default=NEW)
        assert c == f[:end]
    assert cut[0] == full[0][:full[0].index(stop)]


def test_seeded_sampling_reproduces_and_seed_matters():
    model = _with_adapters("llama")
    kw = dict(adapters=ROWS, max_new_tokens=NEW, do_sample=True, temperature=2.0)
    first = generate_ids(model, PROMPTS, seed=3, **kw)
    torch.manual_seed(12345)                             # the global RNG plays no part
    assert generate_ids(model, PROMPTS, seed=3, **kw) == first
    assert generate_ids(model, PROMPTS, seed=4, **kw) != first
    greedy = generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW)
    assert generate_ids(model, PROMPTS, seed=3, **{**kw, "top_p": 1e-9}) == greedy   # nucleus of one token


def test_sample_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(4, 1)
    # top_p 0.6: the nucleus is {0, 1} (0.5 < 0.6, then 0.8 >= 0.6), renormalised to (0.625, 0.375)
    u = torch.tensor([0.0, 0.62, 0.63, 0.999], dtype=torch.float64)
    assert sample_top_p(logits, u, 1.0, 0.6).tolist() == [0, 0, 1, 1]
    # no nucleus: the plain CDF (0.5, 0.8, 1.0)
    assert sample_top_p(logits, torch.tensor([0.49, 0.51, 0.79, 0.81], dtype=torch.float64), 1.0, 1.0).tolist() \
        == [0, 1, 1, 2]
    # temperature 0.5 squares the odds: p = (25, 9, 4) / 38 -> CDF (0.658, 0.895, 1)
    assert sample_top_p(logits, torch.tensor([0.65, 0.66, 0.89, 0.9], dtype=torch.float64), 0.5, 1.0).tolist() \
        == [0, 1, 1, 2]


@pytest.mark.parametrize("method,kind,kw", [("prefix_tuning", "llama", {"num_virtual_tokens": 2}),
                                            ("prefix_tuning", "gpt2", {"num_virtual_tokens": 2}),
                                            ("prompt_tuning", "llama", {"num_virtual_tokens": 3}),
                                            ("prompt_tuning", "gpt2", {"num_virtual_tokens": 3})])
def test_activation_adapters_mixed_rows_equal_alone(method, kind, kw):
    model = _with_adapters(kind, method, **kw)
    rows = ["a", "b", "c", "b", "a"] if method == "prompt_tuning" else ROWS
    mixed = generate_ids(model, PROMPTS, adapters=rows, max_new_tokens=NEW)
    single = generate_ids(model, PROMPTS, adapters=rows, max_new_tokens=NEW, batch_size=1)
    assert mixed == single
    for i, name in enumerate(rows):
        assert mixed[i] == _alone(model, name)[i], (i, name)


def _virtual_token_mix(kind: str, method: str):
    """A LoRA "l" and two adapters of ``method`` with different lengths ("p": 3, "q": 5)."""
    model = make_model(kind)
    cfgs = {"l": dk.LoraConfig(r=4), "p": dk.get_method(method).config(num_virtual_tokens=3),
            "q": dk.get_method(method).config(num_virtual_tokens=5)}
    for i, (name, cfg) in enumerate(cfgs.items()):   # LoRA first: it targets layers inside the backbone
        ad = dk.attach(model, cfg, name=name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_virtual_tokens_mixed_with_other_rows_and_left_padding_equal_alone(kind, method):
    # Prompts of different lengths (left padding) with the KV cache; virtual-token rows of two
    # lengths share the batch with base and LoRA rows. Each row must equal that row decoded alone.
    model = _virtual_token_mix(kind, method)
    for rows in ([None, "p", None, None, None], [None, "p", "l", "q", None], ["q", "p", "p", "l", "q"]):
        mixed = generate_ids(model, PROMPTS, adapters=rows, max_new_tokens=NEW)
        for i, name in enumerate(rows):
            alone = generate_ids(model, [PROMPTS[i]], adapters=[name], max_new_tokens=NEW)[0]
            assert mixed[i] == alone, (rows, i, name)
    # the rows really differ by adapter: otherwise equality above would prove nothing
    outs = {n: generate_ids(model, PROMPTS, adapters=[n] * len(PROMPTS), max_new_tokens=NEW) for n in (None, "p", "q", "l")}
    assert len({tuple(map(tuple, o)) for o in outs.values()}) == 4


def test_bad_arguments_are_one_line_errors():
    model = _with_adapters("llama")
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['zz'\]"):
        generate_ids(model, PROMPTS, adapters=["zz"] * 5, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"one adapter per prompt \(5\), found 2"):
        generate_ids(model, PROMPTS, adapters=["a", "b"], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate_ids(model, PROMPTS, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        generate_ids(model, PROMPTS, max_new_tokens=0)


def test_chat_prompts_are_the_training_prompts(tok):  # noqa: F811
    convo = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "how old are you"}]
    ids, labels = encode_example(tok, [*convo, {"role": "assistant", "content": "seven years"}])
    start = next(j for j, x in enumerate(labels) if x != IGNORE)
    assert encode_prompts(tok, [convo])[0] == ids[:start]        # the model is asked exactly as it was taught
    user = encode_prompts(tok, ["how old are you"])[0]
    assert tok.decode(user) == "<|im_start|> user how old are you <|im_end|> <|im_start|> assistant"
    assert encode_prompts(tok, ["hi there"], chat=False)[0] == tok("hi there")["input_ids"]


def test_generate_text_decodes_the_new_tokens(tok):  # noqa: F811
    model = _with_adapters("llama")
    texts = generate(model, tok, ["hi there", "what is two plus four"], adapters=["a", "b"], max_new_tokens=4)
    ids = generate_ids(model, encode_prompts(tok, ["hi there", "what is two plus four"]), adapters=["a", "b"],
                       max_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=[1, tok.eos_token_id])
    assert texts == [tok.decode(i, skip_special_tokens=True) for i in ids]


# ----------------------------------------------------------------------------- evaluation by generation
class _Bigram(torch.nn.Module):
    """A causal LM with known next-token probabilities: P[current token] (rows sum to one)."""

    P = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(self.P.log())

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.w[input_ids]})()


def test_perplexity_by_hand():
    from deltakit.train.gen_eval import perplexity
    batches = [{"input_ids": torch.tensor([[0, 1, 2]]), "labels": torch.tensor([[IGNORE, 1, 2]])},
               {"input_ids": torch.tensor([[2, 2, 0]]), "labels": torch.tensor([[IGNORE, 2, IGNORE]]),
                "attention_mask": torch.tensor([[1, 1, 0]])}]
    out = perplexity(_Bigram(), batches)
    # scored: P[0][1] = 0.25, P[1][2] = 0.2, P[2][2] = 0.8 -> token-weighted mean over 3 tokens
    assert out["tokens"] == 3
    assert out["nll"] == pytest.approx(-math.log(0.25 * 0.2 * 0.8) / 3)   # 1.0730
    assert out["perplexity"] == pytest.approx(0.04 ** (-1 / 3))      # 2.9240
    with pytest.raises(ValueError, match="labelled tokens"):
        perplexity(_Bigram(), [{"input_ids": torch.tensor([[0, 1]]), "labels": torch.tensor([[IGNORE, IGNORE]])}])


def test_perplexity_on_instruction_data_scores_assistant_tokens_only(tok):  # noqa: F811
    from deltakit.train.gen_eval import perplexity
    from deltakit.train.instruct import make_instruction_loader
    model = _with_adapters("llama")
    exs = [{"prompt": "how old are you", "completion": "seven years"},
           {"messages": [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"}]}]
    loader = make_instruction_loader(exs, tok, batch_size=2)
    batch = next(iter(loader))
    out = perplexity(model, loader)
    # seven years <|im_end|> and six <|im_end|>: 5 assistant tokens, nothing of the prompts
    assert out["tokens"] == 5 == int((batch["labels"] != IGNORE).sum())
    with torch.no_grad():   # transformers' own loss is the same token mean for a single batch
        ref = model(**batch).loss.item()
    assert out["nll"] == pytest.approx(ref, rel=1e-6)


def test_answer_mapping_and_scores():
    from deltakit.train.gen_eval import answer_label, exact_match, label_accuracy
    ans = ("negative", "positive")
    assert answer_label("  Positive!", ans) == 1                         # starts with, any case
    assert answer_label("It is negative, not positive", ans) == 0         # first mentioned
    assert answer_label("nonpositive", ans) is None                       # whole words only
    assert answer_label("No.", ("yes", "no")) == 1 and answer_label("not sure", ("yes", "no")) is None
    out = label_accuracy(["positive", "Negative.", "dunno", "positive"], [1, 1, 0, 1], ans)
    assert out == {"accuracy": 0.5, "unmapped": 1, "predictions": [1, 0, None, 1]}
    assert exact_match(["Seven years.", " six ", "two"], ["seven  years", "Six", "four"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="as many predictions"):
        exact_match(["a"], [])


def test_evaluate_generation_scores_what_generate_says(tok):  # noqa: F811
    from deltakit.train.gen_eval import answer_label, evaluate_generation
    from deltakit.train.instruct import TaskPrompt, task_examples
    model = _with_adapters("llama")
    spec = TaskPrompt("how old are {sentence}", ("seven", "six"))
    exs = task_examples([{"sentence": "you", "label": 0}, {"sentence": "they", "label": 1}], spec)
    res = evaluate_generation(model, tok, exs, task=spec, adapters="a", max_new_tokens=3)
    outs = generate(model, tok, ["how old are you", "how old are they"], adapters="a", max_new_tokens=3)
    assert res["outputs"] == outs
    want = [answer_label(o, spec.answers) for o in outs]
    assert res["accuracy"] == sum(w == y for w, y in zip(want, [0, 1])) / 2
    assert res["unmapped"] == sum(w is None for w in want)
    assert res["exact_match"] == sum(o.strip().casefold() == r for o, r in zip(outs, ["seven", "six"])) / 2


def test_per_prompt_routing_weights_stay_aligned_through_length_sorting():
    """One-hot routing rows give each prompt its adapter (prompts are sorted by length inside,
    so misaligned weights would show); a 50/50 row equals routing that prompt on its own."""
    model = _with_adapters("llama")
    w = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    routed = generate_ids(model, PROMPTS, routing=(NAMES, w), max_new_tokens=NEW, batch_size=2)
    assert routed == generate_ids(model, PROMPTS, adapters=ROWS, max_new_tokens=NEW)
    half = torch.tensor([[0.5, 0.5, 0.0]] * 5)
    both = generate_ids(model, PROMPTS, routing=(NAMES, half), max_new_tokens=NEW, batch_size=5)
    with dk.routed(model, NAMES, half[:1]):
        assert both[2] == generate_ids(model, [PROMPTS[2]], max_new_tokens=NEW)[0]
    assert both != routed
    with pytest.raises(ValueError, match="expected weights for each of 5 prompts"):
        generate_ids(model, PROMPTS, routing=(NAMES, w[:4]), max_new_tokens=2)
