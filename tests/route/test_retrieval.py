"""Retrieval routing (AdapterSwap): hand-worked cosine weights, the access guarantee (an adapter
the caller may not use gets weight exactly 0 and never runs, however similar it is), no
accessible adapter -> an error or, asked for, the base model, data deletion by removal, the
base-model embedder, and one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

import deltakit as dk
from deltakit.library import AdapterLibrary, LibraryError
from deltakit.route import RoutingError, get_router
from deltakit.route.retrieval import Retrieval, base_embedder
from tests.conftest import make_input, make_model, run, word_chat_tokenizer
from tests.library._helpers import lora_dir

# a lookup-table embedder: hand-checkable cosines
VEC = {"about medicine": [1.0, 0.0, 0.0], "about law": [0.0, 1.0, 0.0], "about finance": [0.6, 0.8, 0.0],
       "q1": [2.0, 0.5, 0.0], "q2": [0.0, 3.0, 0.0], "q3": [0.1, 0.0, 1.0]}


def embed(texts):
    return torch.tensor([VEC[t] for t in texts])


def router(groups, **kw):
    keys = [embed(["about medicine"]), embed(["about law"]), embed(["about finance"])]
    kw.setdefault("embed", embed)
    return Retrieval(names=("med", "law", "fin"), keys=keys, access=[["hospital"], ["firm"], []],
                     groups=groups, **kw)


# cosines of q1 = (2, 0.5, 0) / sqrt(4.25) to med, law, fin
N1 = math.sqrt(4.25)
COS1 = [2 / N1, 0.5 / N1, 1.6 / N1]  # 0.9701, 0.2425, 0.7761


def test_registered():
    assert get_router("retrieval") is Retrieval


def test_scores_and_weights_hand_worked():
    r = router(["hospital", "firm"])
    torch.testing.assert_close(r.scores(["q1"])[0], torch.tensor(COS1), atol=1e-6, rtol=0)
    assert r.route_texts(["q1", "q2"]).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # top-2, softmax at temperature 0.1 over (0.9701, 0.7761): med 1 / (1 + e^{-1.940})
    w = router(["hospital", "firm"], top_k=2, temperature=0.1).route_texts(["q1"])[0]
    p = 1 / (1 + math.exp(-(COS1[0] - COS1[2]) / 0.1))
    torch.testing.assert_close(w, torch.tensor([p, 0.0, 1 - p]), atol=1e-6, rtol=0)
    # top-2 with equal weights
    assert router(["hospital", "firm"], top_k=2).route_texts(["q2"])[0].tolist() == [0.0, 0.5, 0.5]


def test_pool_max_against_mean():
    """Adapter 'x' has two texts, (1,0,0) and (0,1,0); the query (1,0,0): best match 1, cosine to
    the centroid (1,1,0)/sqrt2 is 1/sqrt2."""
    keys = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])]
    for pool, expected in (("max", 1.0), ("mean", 1 / math.sqrt(2))):
        r = Retrieval(names=("x",), keys=keys, access=[[]], groups=[], embed=embed, pool=pool)
        assert r.scores(["about medicine"]).item() == pytest.approx(expected, abs=1e-6)


def test_inaccessible_adapter_gets_exactly_zero_even_when_most_similar():
    r = router(["firm"])
    assert r.candidates == (1, 2)
    assert r.scores(["q1"])[0, 0].item() == -math.inf  # never even scored
    w = r.route_texts(["q1", "q2", "q3"] * 4)
    assert torch.equal(w[:, 0], torch.zeros(12))  # med is by far the closest to q1 and q3
    assert w[0].tolist() == [0.0, 0.0, 1.0]  # q1 goes to fin, the best it may use
    for kw in ({"top_k": 3}, {"top_k": 3, "temperature": 100.0}, {"top_k": 2, "temperature": 1e-3}):
        assert torch.equal(router(["firm"], **kw).route_texts(["q1", "q3"])[:, 0], torch.zeros(2))
    # the public adapter only, for a caller with no groups
    assert router([]).route_texts(["q1", "q2"]).tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]


def test_no_accessible_adapter_is_an_error_or_the_base_when_asked():
    keys = [embed(["about medicine"]), embed(["about law"])]
    kw = dict(names=("med", "law"), keys=keys, access=[["hospital"], ["firm"]], embed=embed)
    r = Retrieval(groups=["school"], **kw)
    with pytest.raises(RoutingError, match=r"no adapter is accessible to groups \['school'\] "
                                           r"\(adapters need one of \['firm', 'hospital'\]\)") as err:
        r.route_texts(["q1"])
    assert "\n" not in str(err.value)
    base = Retrieval(groups=["school"], no_access="base", **kw)
    assert base.route_texts(["q1"]).tolist() == [[0.0, 0.0]]


@pytest.fixture
def lib(tmp_path):
    return AdapterLibrary(tmp_path / "lib")


def _library(tmp_path, lib, model):
    """Three LoRAs on tiny Llama: med (group hospital), law (group firm), fin (public)."""
    spec = {"med": ("about medicine", ["hospital"]), "law": ("about law", ["firm"]), "fin": ("about finance", [])}
    for i, (n, (desc, groups)) in enumerate(spec.items()):
        lib.add(lora_dir(tmp_path / n, model, r=2, targets=["q_proj", "v_proj"], seed=i), model=model,
                description=desc, groups=groups)


def test_caller_without_access_is_never_routed_to_the_adapter(tmp_path, lib):
    model = make_model("llama")
    _library(tmp_path, lib, model)
    x = make_input("llama", batch=2)
    batch = {"input_ids": x, "texts": ["q1", "q3"]}  # both closest to med
    r = Retrieval.from_library(lib, None, model, groups=["firm"], embed=embed)
    assert sorted(dk.adapters(model)) == ["fin", "law"]  # med is not even attached
    with r.scope(model, batch):
        out = run(model, x)
    with dk.routed(model, ["fin"], torch.ones(2, 1)):
        assert torch.equal(out, run(model, x))
    assert [d.weights for d in r.decisions] == [{"fin": 1.0}, {"fin": 1.0}]
    # a shared model with every adapter attached: med still contributes nothing for this caller
    lib.load(model, "med", activate=False)
    dk.set_active(model, ["med"])
    with r.scope(model, batch):
        assert torch.equal(run(model, x), out)
    # with access, med is what these rows get
    r2 = Retrieval.from_library(lib, None, model, groups=["hospital"], embed=embed)
    with r2.scope(model, batch):
        with_med = run(model, x)
    with dk.routed(model, ["med"], torch.ones(2, 1)):
        assert torch.equal(with_med, run(model, x))
    assert (with_med - out).abs().max() > 1e-2


def test_no_access_base_runs_the_base_model(tmp_path, lib):
    model = make_model("llama")
    x = make_input("llama", batch=2)
    base = run(model, x)
    lib.add(lora_dir(tmp_path / "med", model, r=2, targets=["q_proj"], seed=0), model=model,
            description="about medicine", groups=["hospital"])
    with pytest.raises(RoutingError, match="no adapter is accessible"):
        with Retrieval.from_library(lib, None, model, groups=[], embed=embed).scope(model, {"texts": ["q1", "q1"]}):
            pass
    r = Retrieval.from_library(lib, None, model, groups=[], embed=embed, no_access="base")
    lib.load(model, "med")  # attached and active: the plain forward would use it
    with r.scope(model, {"texts": ["q1", "q1"]}):
        assert torch.equal(run(model, x), base)
    assert [d.weights for d in r.decisions] == [{}, {}]


def test_removing_an_adapter_removes_it_from_the_candidates(tmp_path, lib):
    model = make_model("llama")
    _library(tmp_path, lib, model)
    r = Retrieval.from_library(lib, None, None, groups=["hospital"], embed=embed)
    assert r.names == ("fin", "law", "med") and r.candidates == (0, 2)
    assert r.route_texts(["q1"]).tolist() == [[0.0, 0.0, 1.0]]  # med
    lib.remove("med")
    r = Retrieval.from_library(lib, None, None, groups=["hospital"], embed=embed)
    assert r.names == ("fin", "law") and r.candidates == (0,)
    assert r.route_texts(["q1"]).tolist() == [[1.0, 0.0]]  # the public fin is all that is left
    with pytest.raises(LibraryError):
        Retrieval.from_library(lib, ["med", "fin"], None, groups=["hospital"], embed=embed)
    lib.remove("fin")
    with pytest.raises(RoutingError, match=r"no adapter is accessible to groups \['hospital'\]"):
        Retrieval.from_library(lib, None, None, groups=["hospital"], embed=embed).route_texts(["q1"])


def test_examples_and_newest_version(tmp_path, lib):
    model = make_model("llama")
    for s in (1, 2):
        lib.add(lora_dir(tmp_path / f"v{s}", model, r=2, targets=["q_proj"], seed=s), model=model, name="a")
    r = Retrieval.from_library(lib, None, None, groups=[], embed=embed, examples={"a": ["about law", "q3"]})
    assert r.names == ("a",) and r.keys[0].shape == (2, 3)
    with pytest.raises(RoutingError, match="entry a@2 has no description and no examples"):
        Retrieval.from_library(lib, None, None, groups=[], embed=embed)
    with pytest.raises(RoutingError, match="distinct names"):
        Retrieval.from_library(lib, ["a@1", "a@2"], None, groups=[], embed=embed, examples={"a": ["q1"]})


def test_base_embedder_is_the_base_models_mean_pooled_last_state():
    tok = word_chat_tokenizer(["red", "green", "blue", "sky"])
    model = make_model("llama")
    texts = ["red sky", "green blue sky red", "blue"]
    e = base_embedder(model, tok)(texts)
    for i, t in enumerate(texts):
        ids = tok(t, return_tensors="pt")["input_ids"]
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(e[i], h.mean(0), atol=1e-5, rtol=1e-5)
    a = dk.attach(model, dk.LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="x")
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    assert torch.equal(base_embedder(model, tok)(texts), e)  # adapters are disabled while embedding


def test_default_embedder_from_library(tmp_path, lib):
    tok = word_chat_tokenizer(["red", "green", "blue", "sky", "sea"])
    model = make_model("llama")
    lib.add(lora_dir(tmp_path / "s", model, r=2, targets=["q_proj"], seed=0), model=model, description="red sky")
    lib.add(lora_dir(tmp_path / "b", model, r=2, targets=["q_proj"], seed=1), model=model, description="blue sea")
    r = Retrieval.from_library(lib, None, model, groups=[], tokenizer=tok)
    assert r.route_texts(["red sky", "blue sea"]).tolist() == [[0.0, 1.0], [1.0, 0.0]]  # names b, s
    with pytest.raises(RoutingError, match="needs embed= or a model and its tokenizer"):
        Retrieval.from_library(lib, None, model, groups=[])


@pytest.mark.parametrize("kwargs,match", [
    ({"groups": None}, r"groups \(the caller's access groups\): expected a list of group names"),
    ({"groups": "firm"}, "expected a list of group names"),
    ({"top_k": 0}, "top_k: expected an integer >= 1, found 0"),
    ({"temperature": 0.0}, "temperature: expected a finite number > 0 or None"),
    ({"pool": "min"}, "pool: expected 'max' or 'mean', found 'min'"),
    ({"no_access": "silent"}, "no_access: expected 'error' or 'base'"),
    ({"embed": 3}, "embed: expected a function"),
    ({"access": [["a"], ["b"]]}, r"access: expected one group list per adapter \(3\), found 2"),
    ({"access": [["a"], "b", []]}, "access groups of 'law'"),
    ({"keys": [torch.ones(3)] * 3}, r"keys of 'med': expected a float tensor \(n >= 1, d\), found \(3,\)"),
    ({"keys": [torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 2)]}, r"same width, found \[2, 3\]"),
])
def test_bad_construction_is_one_line(kwargs, match):
    args = dict(names=("med", "law", "fin"), keys=[torch.ones(1, 3)] * 3, access=[[], [], []], groups=[],
                embed=embed) | kwargs
    with pytest.raises(RoutingError, match=match) as err:
        Retrieval(**args)
    assert "\n" not in str(err.value)


def test_bad_calls_are_one_line():
    r = router(["firm"])
    for call, match in ((lambda: r.weights_for(None, {"input_ids": 1}), "the batch needs 'texts'"),
                        (lambda: r.weights_for(None, {"input_ids": torch.ones(2, 3), "texts": ["q1"]}),
                         r"retrieval: 1 texts for a batch of 2 rows"),
                        (lambda: base_embedder(torch.nn.Linear(2, 2), word_chat_tokenizer(["a"]))(["a"]),
                         "the default embedder needs a model that returns hidden_states"),
                        (lambda: r.route_texts("q1"), "expected a non-empty list of strings"),
                        (lambda: r.route_texts([]), "expected a non-empty list of strings"),
                        (lambda: Retrieval(names=("a",), keys=[torch.ones(1, 3)], access=[[]], groups=[])
                         .route_texts(["q1"]), "has no embed function"),
                        (lambda: router(["firm"], embed=lambda t: torch.ones(len(t), 2)).route_texts(["q1"]),
                         r"embed: expected a tensor \(1, 3\) for 1 texts, found \(1, 2\)")):
        with pytest.raises(RoutingError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_describe():
    assert router(["firm"], top_k=2, temperature=0.5).describe() == (
        "retrieval: 2 of 3 adapters accessible to groups ['firm'], pool=max, top_k=2, softmax temperature 0.5")


def test_route_gives_the_adapters_used_for_generate():
    r = router(["hospital", "firm"])
    names, w = r.route(["q1", "q2", "q1"])
    assert names == ("med", "law") and w.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert [d.top for d in r.decisions] == ["med", "law", "med"]
    names, w = router(["firm"], top_k=2).route(["q1"])  # med, the closest, is not there
    assert names == ("law", "fin") and w.tolist() == [[0.5, 0.5]]  # top-2, equal weights
    keys = [embed(["about medicine"])]
    base = Retrieval(names=("med",), keys=keys, access=[["hospital"]], groups=[], embed=embed, no_access="base")
    names, w = base.route(["q1", "q2"])
    assert names == () and w.shape == (2, 0)
