"""Arrow routing: hand-worked weights, one adapter == that adapter alone, top-1 == the chosen
adapter per token, mixed ranks and targets against an independent per-token reference, the
prototypes read from the library (not recomputed), decisions, errors, and parity with peft."""
from __future__ import annotations

import math

import pytest
import torch

import deltakit as dk
from deltakit.library import AdapterLibrary
from deltakit.route import RoutingError, get_router
from deltakit.route.arrow import Arrow, arrow_weights
from tests.conftest import make_input, make_model, run
from tests.library._helpers import lora_dir

E = math.e


def _linear_with(names_ranks: dict[str, int], seed: int = 0) -> torch.nn.Module:
    """One Linear(3 -> 2) carrying LoRAs of the given ranks, seeded random factors."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(seed + 1)
    for name, r in names_ranks.items():
        a = dk.attach(model, dk.LoraConfig(r=r, targets=["0"]), name=name)
        with torch.no_grad():
            for _, p in sorted(a.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


HAND = {"0": {"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 1.0, 0.0]),
              "c": torch.tensor([0.6, 0.8, 0.0])}}


def test_registered():
    assert get_router("arrow") is Arrow


def test_weights_hand_worked():
    """x = (2, -1, 0): scores |2|, |-1|, |1.2 - 0.8| = 0.4 -> top-2 {a, b}: softmax(2, 1) =
    (e/(e+1), 1/(e+1)); x = (0.5, 1, 0): scores 0.5, 1, 1.1 -> top-2 {c, b}: softmax(1.1, 1)."""
    model = _linear_with({"a": 1, "b": 2, "c": 1})
    x = torch.tensor([[[2.0, -1.0, 0.0], [0.5, 1.0, 0.0]]])  # (B=1, T=2, in=3)
    fn = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=2).weights_for(model, {})
    w = fn(model[0], x)
    s = 1 / (1 + math.exp(-0.1))  # softmax(1.1, 1.0)[0]
    expected = torch.tensor([[[E / (E + 1), 1 / (E + 1), 0.0], [0.0, 1 - s, s]]])
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    # temperature 0.5 doubles the scores: softmax(4, 2) = (e^2/(e^2+1), 1/(e^2+1))
    fn = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=2, temperature=0.5).weights_for(model, {})
    torch.testing.assert_close(fn(model[0], x)[0, 0], torch.tensor([E**2 / (E**2 + 1), 1 / (E**2 + 1), 0.0]),
                               atol=1e-6, rtol=0)
    # top_k = 1: one-hot on the largest score; top_k beyond K keeps all three
    fn = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=1).weights_for(model, {})
    assert fn(model[0], x).tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    z = sum(math.exp(v) for v in (2.0, 1.0, 0.4))
    w = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=9).weights_for(model, {})(model[0], x)
    torch.testing.assert_close(w[0, 0], torch.tensor([math.exp(2) / z, math.exp(1) / z, math.exp(0.4) / z]),
                               atol=1e-6, rtol=0)


def test_arrow_weights_function():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    w = arrow_weights(scores, 2, 1.0)
    torch.testing.assert_close(w, torch.tensor([[E / (E + 1), 0.0, 1 / (E + 1), 0.0]]), atol=1e-6, rtol=0)


@pytest.fixture
def lib(tmp_path):
    return AdapterLibrary(tmp_path / "lib")


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj"]), ("bert", ["query", "value"])])
def test_one_adapter_equals_that_adapter_alone(tmp_path, lib, kind, targets):
    model = make_model(kind)
    x = make_input(kind)
    base = run(model, x)
    e = lib.add(lora_dir(tmp_path / "a", model, r=2, targets=targets, seed=3, alpha=0.5), model=model)
    router = Arrow.from_library(lib, [e.ref], model, top_k=1)
    assert dk.active(model) == []  # attached inactive: the plain forward is still the base
    with router.scope(model, {"input_ids": x}):
        out = run(model, x)
    with dk.routed(model, [e.name], torch.ones(x.shape[0], 1)):
        fixed = run(model, x)
    dk.set_active(model, [e.name])
    alone = run(model, x)
    assert torch.equal(out, fixed)  # every token's weight is exactly 1
    torch.testing.assert_close(out, alone, atol=1e-6, rtol=0)
    assert (out - base).abs().max() > 1e-4  # the adapter does change the output (100x the tolerance)
    assert [d.weights for d in router.decisions] == [{e.name: 1.0}] * x.shape[0]
    assert router.decisions[0].tokens == [e.name] * x.shape[1]


def _tokens_near(protos: dict[str, torch.Tensor], order: list[str], seed: int) -> torch.Tensor:
    """Tokens (1, T, 3): +-3 x the named prototype plus small noise, so each is routed clearly."""
    g = torch.Generator().manual_seed(seed)
    rows = [(3.0 if i % 2 else -3.0) * protos[n] + 0.05 * torch.randn(3, generator=g) for i, n in enumerate(order)]
    return torch.stack(rows)[None]


def test_top1_is_the_chosen_adapters_output_per_token(tmp_path, lib):
    model = _linear_with({"a": 1, "b": 2})
    for name in ("a", "b"):
        dk.save_adapter(dk.get_adapter(model, name), tmp_path / name)
    dk.detach(model, "a"), dk.detach(model, "b")
    refs = [lib.add(tmp_path / n, model=model).ref for n in ("a", "b")]
    router = Arrow.from_library(lib, refs, model, top_k=1)
    protos = {n: router.prototypes["0"][n] for n in ("a", "b")}
    order = ["a", "b", "b", "a", "b"]
    x = _tokens_near(protos, order, seed=0)
    chosen = ["a" if abs(float(t @ protos["a"])) > abs(float(t @ protos["b"])) else "b" for t in x[0]]
    assert chosen == order
    with router.scope(model, {}):
        out = model(x)
    for t, name in enumerate(chosen):
        dk.set_active(model, [name])
        torch.testing.assert_close(out[0, t], model(x[:, t])[0], atol=1e-6, rtol=0)
    assert router.decisions[0].tokens == order
    assert router.decisions[0].weights == {"b": 0.6, "a": 0.4}


def _reference_fn(model, lib, refs, names, top_k, temperature):
    """An independent Arrow: plain Python loops over tokens and adapters, prototypes from the
    library's routing files, for dk.routed's callable."""
    paths = {id(m): p for p, m in model.named_modules()}
    stored = {n: lib.routing(r) for n, r in zip(names, refs)}

    def fn(layer, x):
        path = paths[id(layer)]
        present = [k for k, n in enumerate(names) if f"prototype.{path}" in stored[n]]
        out = torch.zeros(*x.shape[:-1], len(names))
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape[:-1]]):
            tok = x[tuple(idx)].double()
            scores = {k: abs(float(tok @ stored[names[k]][f"prototype.{path}"].double())) for k in present}
            kept = sorted(scores, key=lambda k: -scores[k])[:top_k]
            z = sum(math.exp(scores[k] / temperature) for k in kept)
            for k in kept:
                out[tuple(idx) + (k,)] = math.exp(scores[k] / temperature) / z
        return out
    return fn


def test_mixed_ranks_and_targets_match_an_independent_reference(tmp_path, lib):
    model = make_model("llama")
    x = make_input("llama", batch=2)
    spec = {"a": (2, ["q_proj", "v_proj"]), "b": (4, ["q_proj"]), "c": (3, ["v_proj", "o_proj"])}
    refs = [lib.add(lora_dir(tmp_path / n, model, r=r, targets=t, seed=i, alpha=0.3), model=model).ref
            for i, (n, (r, t)) in enumerate(spec.items())]
    router = Arrow.from_library(lib, refs, model, top_k=2, temperature=0.7)
    with router.scope(model, {"input_ids": x}):
        out = run(model, x)
    with dk.routed(model, router.names, _reference_fn(model, lib, refs, router.names, 2, 0.7)):
        ref = run(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # per layer: only the adapters present are candidates; alone at a layer -> weight exactly 1
    fn = router.weights_for(model, {})
    h = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    o_proj = model.model.layers[0].self_attn.o_proj
    assert torch.equal(fn(o_proj, h), torch.tensor([0.0, 0.0, 1.0]).expand(2, 4, 3))
    v = fn(model.model.layers[0].self_attn.v_proj, h)
    assert torch.equal(v[..., 1], torch.zeros(2, 4))
    torch.testing.assert_close(v.sum(-1), torch.ones(2, 4), atol=1e-6, rtol=0)
    assert len(router.decisions) == 2 and set(router.decisions[0].weights) == {"a", "b", "c"}


def test_prototypes_come_from_the_library_not_recomputed(tmp_path, lib, monkeypatch):
    model = make_model("llama")
    x = make_input("llama")
    refs = [lib.add(lora_dir(tmp_path / n, model, r=2, targets=["q_proj", "v_proj"], seed=s), model=model).ref
            for s, n in enumerate(("a", "b"))]
    first = make_model("llama")
    r1 = Arrow.from_library(lib, refs, first, top_k=1)
    with r1.scope(first, {}):
        expected = run(first, x)

    def no_svd(*args, **kwargs):
        raise AssertionError("Arrow must not recompute prototypes")
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "qr", no_svd)
    monkeypatch.setattr("deltakit.library._routing.prototype", no_svd)
    second = make_model("llama")
    router = Arrow.from_library(lib, refs, second, top_k=1)
    with router.scope(second, {}):
        assert torch.equal(run(second, x), expected)
    stored = lib.routing(refs[0])
    for path, by in router.prototypes.items():
        assert torch.equal(by["a"], stored[f"prototype.{path}"])


def test_decisions_leave_padding_out():
    model = _linear_with({"a": 1, "b": 1, "c": 1})
    router = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=1)
    x = torch.tensor([[[2.0, -1.0, 0.0], [0.5, 1.0, 0.0], [0.0, -3.0, 0.0]]] * 2)  # tops a, c, b
    with router.scope(model, {"attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}):
        model(x)
    assert router.decisions[0].tokens == ["a", "c", "b"]
    assert router.decisions[0].weights == {"a": 0.3333, "c": 0.3333, "b": 0.3333}
    assert router.decisions[1].tokens == ["c", "b"]
    assert router.decisions[1].weights == {"c": 0.5, "b": 0.5}


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 0}, "top_k: expected an integer >= 1, found 0"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"temperature": 0}, "temperature: expected a finite number > 0, found 0"),
    ({"temperature": float("inf")}, "temperature"),
    ({"names": ("a", "a")}, "distinct adapter names"),
    ({"names": ("a", "b", "c", "d")}, r"no prototype for adapters \['d'\]"),
    ({"prototypes": {"0": {"z": torch.ones(3)}}}, "'z' at 0: not one of the router's adapters"),
    ({"prototypes": {"0": {"a": torch.ones(3, 1)}}}, r"expected a float vector \(in,\), found \(3, 1\)"),
])
def test_bad_construction_is_one_line(kwargs, match):
    args = {"names": ("a", "b", "c"), "prototypes": HAND} | kwargs
    if "prototypes" in kwargs:
        args["names"] = ("a",)
    with pytest.raises(RoutingError, match=match) as err:
        Arrow(**args)
    assert "\n" not in str(err.value)


def test_layers_must_match_the_prototypes():
    model = _linear_with({"a": 1, "b": 1})
    with pytest.raises(RoutingError, match=r"adapters \['b'\] are attached at 0 but have no Arrow prototype"):
        Arrow(names=("a", "b"), prototypes={"0": {"a": HAND["0"]["a"]}, "1": {"b": HAND["0"]["b"]}}).weights_for(model, {})
    with pytest.raises(RoutingError, match="adapter 'a' has an Arrow prototype at 9 but is not attached there"):
        Arrow(names=("a",), prototypes={"0": {"a": HAND["0"]["a"]}, "9": {"a": HAND["0"]["a"]}}).weights_for(model, {})
    fn = Arrow(names=("a",), prototypes={"0": {"a": torch.ones(5)}}).weights_for(model, {})
    with pytest.raises(RoutingError, match=r"Arrow at 0: prototypes of width 5 cannot score this layer.s input \(1, 3\)"):
        fn(model[0], torch.ones(1, 3))


def test_from_library_refuses_duplicate_names(tmp_path, lib):
    model = make_model("llama")
    for s in (1, 2):
        lib.add(lora_dir(tmp_path / f"v{s}", model, r=2, targets=["q_proj"], seed=s, name="same"), model=model,
                name="same")
    with pytest.raises(RoutingError, match="distinct names"):
        Arrow.from_library(lib, ["same@1", "same@2"], model)


def test_describe():
    r = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=2, temperature=0.5)
    assert r.describe() == "arrow: 3 adapters (a, b, c), 1 layers, top_k=2, temperature=0.5"


def _peft_lora_dir(out, seed: int):
    """A peft LoRA (r=2, q_proj/v_proj) of seeded random factors, saved with save_pretrained."""
    import peft
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return out


def test_parity_with_peft_arrow(tmp_path, lib):
    """peft's Arrow (create_arrow_model) on the same three peft LoRAs: its power-iteration
    prototypes agree with the library's SVD ones up to sign, and with the library's prototypes
    put in its place, its logits equal ours (same scores, top-k, softmax, scaling)."""
    peft = pytest.importorskip("peft")
    dirs = [_peft_lora_dir(tmp_path / f"p{i}", seed=10 + i) for i in range(3)]
    ours = make_model("llama")
    refs = [lib.add(d, model=ours, name=f"t{i}").ref for i, d in enumerate(dirs)]
    router = Arrow.from_library(lib, refs, ours, top_k=2, temperature=0.5)
    x = make_input("llama")
    with router.scope(ours, {}):
        mine = run(ours, x)
    assert (mine - run(make_model("llama"), x)).abs().max() > 1e-2  # the routed adapters matter
    theirs = peft.create_arrow_model(make_model("llama"), [str(d) for d in dirs],
                                     peft.ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0))
    theirs.eval()
    with torch.no_grad():
        run(theirs, x)  # peft builds its prototypes lazily, on the first forward
    layers = {p.removeprefix("base_model.model."): m for p, m in theirs.named_modules() if hasattr(m, "lora_arrow")}
    assert sorted(layers) == sorted(router.prototypes)
    for path, m in layers.items():
        arrow = m.lora_arrow["arrow_router"]
        mine_p = torch.stack([router.prototypes[path][f"t{i}"] for i in range(3)])
        cos = (arrow.prototypes * mine_p).sum(-1).abs()
        assert cos.min() > 0.99, (path, cos)  # peft stops its power iteration after 15 steps (0.9987 seen)
        arrow.prototypes = mine_p.clone()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, x), mine.detach(), atol=1e-5, rtol=1e-5)


def _body_and_head(names) -> torch.nn.Module:
    """Linear(3 -> 3) with a LoRA per name, then Linear(3 -> 2) that each adapter copies in full."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(1)
    for name in names:
        a = dk.attach(model, dk.LoraConfig(r=1, targets=["0"], modules_to_save=["1"]), name=name)
        with torch.no_grad():
            for _, p in sorted(a.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_a_head_copied_in_full_takes_the_rows_mean_weight():
    """Layer 0 routes the two tokens of the hand-worked case to (e/(e+1), 1/(e+1), 0) and
    (0, 1-s, s); the head (no prototype) takes their mean per row, masked tokens left out."""
    model = _body_and_head(["a", "b", "c"])
    x = torch.tensor([[[2.0, -1.0, 0.0], [0.5, 1.0, 0.0]]])
    s = 1 / (1 + math.exp(-0.1))
    t1, t2 = torch.tensor([E / (E + 1), 1 / (E + 1), 0.0]), torch.tensor([0.0, 1 - s, s])
    router = Arrow(names=("a", "b", "c"), prototypes={"0": HAND["0"]}, top_k=2)
    fn = router.weights_for(model, {})
    with pytest.raises(RoutingError, match="Arrow reached 1 .copied in full, no prototype. before any routed layer"):
        fn(model[1], x)
    fn(model[0], x)
    torch.testing.assert_close(fn(model[1], torch.zeros(1, 2, 3)), ((t1 + t2) / 2).reshape(1, 1, 3), atol=1e-6, rtol=0)
    fn = router.weights_for(model, {"attention_mask": torch.tensor([[1, 0]])})
    fn(model[0], x)
    torch.testing.assert_close(fn(model[1], torch.zeros(1, 2, 3)), t1.reshape(1, 1, 3), atol=1e-6, rtol=0)
    # end to end: the head mixes the three full copies by the row mean: y0 + sum_k w_k (y_k - y0)
    with router.scope(model, {}):
        out = model(x)
    with dk.routed(model, router.names, torch.stack([t1, t2])[None]):
        h = model[0](x)  # (1, 2, 3): layer 0 with the hand-worked per-token weights
    y0 = model[1].base(h)
    mean = (t1 + t2) / 2
    expected = y0 + sum(mean[k] * (torch.nn.functional.linear(h, model[1].deltas[n].values["weight"],
                                                               model[1].deltas[n].values["bias"]) - y0)
                        for k, n in enumerate("abc"))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert (out - model[1].base(h)).abs().max() > 1e-2


def test_one_adapter_with_its_head_equals_that_adapter_alone(tmp_path, lib):
    model = make_model("bert")
    x = make_input("bert")
    cfg = dk.LoraConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"], alpha=4)
    a = dk.attach(model, cfg, name="a")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(a.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    dk.save_adapter(a, tmp_path / "a")
    dk.detach(model, "a")
    base = run(model, x)
    router = Arrow.from_library(lib, [lib.add(tmp_path / "a", model=model).ref], model, top_k=1)
    with router.scope(model, {"input_ids": x}):
        out = run(model, x)
    dk.set_active(model, ["a"])
    torch.testing.assert_close(out, run(model, x), atol=1e-6, rtol=0)
    assert (out - base).abs().max() > 1e-2


def test_decisions_follow_generation(tmp_path, lib):
    """Within one scope, generate feeds the prompt (6 tokens) then 3 generated ones: each row's
    decision covers its 9 positions minus its padding."""
    model = make_model("llama")
    refs = [lib.add(lora_dir(tmp_path / n, model, r=2, targets=["q_proj", "v_proj"], seed=i, alpha=0.2),
                    model=model).ref for i, n in enumerate("ab")]
    router = Arrow.from_library(lib, refs, model, top_k=1)
    x = make_input("llama", batch=2)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    with router.scope(model, {"input_ids": x, "attention_mask": mask}):
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape == (2, 10)
    assert [len(d.tokens) for d in router.decisions] == [9, 7]
    for d in router.decisions:
        assert sum(d.weights.values()) == pytest.approx(1.0, abs=1e-3)


def test_decisions_over_several_batches_in_one_scope():
    """Batches of 2 and then 3 rows, the second followed by a one-token decoding step: five
    decisions, the step's token appended to the second batch's rows."""
    model = _linear_with({"a": 1, "b": 1, "c": 1})
    router = Arrow(names=("a", "b", "c"), prototypes=HAND, top_k=1)
    ta, tc, tb = [2.0, -1.0, 0.0], [0.5, 1.0, 0.0], [0.0, -3.0, 0.0]  # routed to a, c, b
    with router.scope(model, {}):
        model(torch.tensor([[ta, tc, tb], [tb, tb, ta]]))
        model(torch.tensor([[ta, ta], [tc, tc], [tb, tc]]))
        model(torch.tensor([[tb], [ta], [tc]]))
    assert [d.tokens for d in router.decisions] == [["a", "c", "b"], ["b", "b", "a"], ["a", "a", "b"],
                                                    ["c", "c", "a"], ["b", "c", "c"]]
    assert router.decisions[1].weights == {"b": 0.6667, "a": 0.3333}
