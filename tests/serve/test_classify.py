"""Classification on an encoder base: a tiny random BERT and two LoRA adapters (ranks 2 and 4)
that each carry their own classification head. Every answer equals that adapter classifying
the text alone on an identical model; rows of both adapters share one forward; the shared
parts (models, auth, errors, metrics) answer as on the generative server."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch

import deltakit as dk
from tests.conftest import word_chat_tokenizer
from tests.serve.helpers import randomize

WORDS = [f"w{i}" for i in range(40)]
HEADS = {"a": 2, "b": 4}   # adapter -> LoRA rank
KEY = "sk-classify"
TEXTS = ["w1 w2 w3", "w7", "w30 w31 w32 w33 w34 w35", "w11 w12"]


def tiny_encoder(seed: int = 0):
    """(BertForSequenceClassification with 3 labels, a word-level tokenizer over its vocabulary)."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = word_chat_tokenizer(WORDS)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3, pad_token_id=0,
                     id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    return BertForSequenceClassification(cfg).eval(), tok


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-adapters")
    model, _ = tiny_encoder()
    out = {}
    for i, (name, r) in enumerate(HEADS.items()):
        ad = dk.attach(model, dk.LoraConfig(r=r, modules_to_save=("classifier",)), name=name)
        randomize(ad, 300 + i)   # the head is a full copy: each adapter gets its own random head
        out[name] = dk.save_adapter(ad, root / name)
        dk.detach(model, name)
    return root, out


@pytest.fixture(scope="module")
def alone(adapters):
    """name -> text -> probabilities of that adapter on that text alone (batch of one, no padding)."""
    model, tok = tiny_encoder()
    for name, p in adapters[1].items():
        dk.load_adapter(model, p, name=name, activate=False)
    out = {}
    with torch.no_grad():
        for name in HEADS:
            dk.set_active(model, name)
            out[name] = {t: model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0] for t in TEXTS}
    return out


def _app(adapters, **limits):
    from deltakit.serve.classify import build_classify_app
    from deltakit.serve.engine import Limits
    from deltakit.serve.server import ServeOptions

    root, paths = adapters
    model, tok = tiny_encoder()
    opts = ServeOptions(adapters={n: str(p) for n, p in paths.items()}, adapter_dirs=[str(root)], api_key=KEY,
                        limits=Limits(**{"max_batch": 8, "max_prompt": 12, **limits}))
    return build_classify_app(model, tok, "tiny-bert", opts)


@pytest.fixture(scope="module")
def server(adapters):
    from deltakit.serve.server import LiveServer

    with LiveServer(_app(adapters)) as srv:
        yield srv


def _post(server, body, key=KEY):
    return httpx.post(f"{server.url}/v1/classify", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def _check(rows, name, texts, alone):
    assert [r["index"] for r in rows] == list(range(len(texts)))
    for r, t in zip(rows, texts):
        want = alone[name][t]
        assert torch.allclose(torch.tensor(r["probs"]), want, atol=1e-6), (name, t, r["probs"], want)
        assert r["label_id"] == int(want.argmax()) and r["label"] == ["neg", "neu", "pos"][r["label_id"]]
        assert r["num_classes"] == 3


def test_each_adapter_classifies_with_its_own_head_as_alone(server, alone):
    for name in HEADS:
        got = _post(server, {"model": name, "input": TEXTS})
        assert got.status_code == 200, got.text
        _check(got.json()["data"], name, TEXTS, alone)
        assert got.json()["usage"]["prompt_tokens"] == sum(len(t.split()) for t in TEXTS)
    one = _post(server, {"model": "a", "input": TEXTS[2]}).json()["data"]   # a single string
    _check(one, "a", TEXTS[2:3], alone)
    # the heads differ: the two adapters do not give the same probabilities
    assert not torch.allclose(alone["a"][TEXTS[0]], alone["b"][TEXTS[0]], atol=1e-3)


def test_concurrent_requests_of_both_adapters_each_equal_alone(server, alone):
    jobs = [(name, TEXTS[i:i + 2]) for i in range(3) for name in HEADS]
    with cf.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda j: _post(server, {"model": j[0], "input": j[1]}), jobs))
    for (name, texts), got in zip(jobs, answers):
        assert got.status_code == 200, got.text
        _check(got.json()["data"], name, texts, alone)


def test_rows_of_different_adapters_share_one_forward(adapters, alone):
    """Engine level, deterministic: two requests queued before a step run in ONE forward."""
    from deltakit.serve.classify import ClassifyRequest

    app = _app(adapters)
    svc = app.state.service
    forwards = []
    svc.engine.model.register_forward_hook(lambda *_: forwards.append(1))
    results = {}
    for name, texts in (("a", TEXTS[:3]), ("b", TEXTS[1:])):
        key = svc.residency.acquire(name).key
        rows = [list(x) for x in svc.tokenizer(texts)["input_ids"]]
        svc.engine.submit(ClassifyRequest(rows, sink=lambda out, n=name: results.__setitem__(n, out), adapter=key))
    assert svc.engine.step() and len(forwards) == 1
    for name, texts in (("a", TEXTS[:3]), ("b", TEXTS[1:])):
        assert torch.allclose(results[name], torch.stack([alone[name][t] for t in texts]), atol=1e-6)
    assert svc.residency._pins == {}   # every pin given back


def test_models_auth_errors_and_metrics(server):
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert {m["id"] for m in models["data"]} == {"tiny-bert", "a", "b"}
    before = _metrics(server)
    assert _post(server, {"model": "a", "input": ["w1"]}, key=None).status_code == 401
    cases = [({"model": "nope", "input": ["w1"]}, 404, "model"),
             ({"model": "tiny-bert", "input": ["w1"]}, 400, "model"),          # the base's head is random
             ({"model": "a", "input": []}, 400, "input"),
             ({"model": "a", "input": [" ".join(WORDS[:13])]}, 400, "input"),   # 13 tokens > max_prompt 12
             ({"model": "a", "input": ["w1"] * 9}, 400, "input"),               # 9 texts > max_batch 8
             ({"model": "a"}, 400, "input")]
    for body, status, param in cases:
        got = _post(server, body)
        assert got.status_code == status, (body, got.text)
        err = got.json()["error"]
        assert err["param"] == param and err["message"] and err["type"] in ("invalid_request_error",), err
    assert _post(server, {"model": "b", "input": TEXTS[:2]}).status_code == 200
    after = _metrics(server)
    done_b = ("deltakit_requests_total", ("adapter", "b"), ("status", "done"))
    assert after[done_b] - before.get(done_b, 0) == 1
    tokens_b = ("deltakit_tokens_total", ("adapter", "b"), ("kind", "prompt"))
    assert after[tokens_b] - before.get(tokens_b, 0) == 4     # "w1 w2 w3" + "w7"
    refused_a = ("deltakit_requests_total", ("adapter", "a"), ("status", "400"))
    assert after[refused_a] - before.get(refused_a, 0) == 3   # empty, too long, too many
    assert after[("deltakit_requests_total", ("adapter", ""), ("status", "404"))] >= 1


def _metrics(server) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_encoder_base_loading_and_kind(tmp_path, adapters):
    from deltakit.serve.classify import is_encoder, load_encoder_base
    from tests.serve.helpers import tiny_lm

    model, tok = tiny_encoder()
    model.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    lm, lm_tok = tiny_lm()
    lm.save_pretrained(tmp_path / "llama")
    assert is_encoder(str(tmp_path / "bert")) and not is_encoder(str(tmp_path / "llama"))
    loaded, _, base_head = load_encoder_base(str(tmp_path / "bert"), {n: str(p) for n, p in adapters[1].items()})
    assert loaded.config.num_labels == 3 and base_head   # a classification checkpoint: its head is trained
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
