"""The routed forward: soft weights over adapters, per row, per token or per layer.

References are computed independently: per-row weights equal a model whose weights are
``W + sum_k w_k dW_k`` (exact for weight deltas, since every adapted layer is linear in W;
compared at 1e-6 because ``weight_delta`` hands dW over in fp32), per-token weights equal
routing each token on its own.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import deltakit as dk
from deltakit.core.layer import DeltaStateError
from deltakit.methods.lora import LoraConfig

from ..conftest import make_model


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()


def _randomise(model, *names):
    g = torch.Generator().manual_seed(3)
    for n in names:
        for p in dk.get_adapter(model, n).parameters():
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _two_loras():
    """a: rank 2 on both layers; b: rank 3 on the first only (mixed ranks and targets)."""
    m = _mlp()
    dk.attach(m, LoraConfig(r=2, targets=["0", "2"], alpha=4.0), name="a")
    dk.attach(m, LoraConfig(r=3, targets=["0"], alpha=3.0), name="b")
    _randomise(m, "a", "b")
    return m


def _merged_reference(m, weights: dict[str, float]):
    """A plain copy of the base with ``W + sum_k w_k dW_k`` in every layer."""
    ref = _mlp()
    with torch.no_grad():
        for path in ("0", "2"):
            layer = m.get_submodule(path)
            w = layer.base_params()["weight"].clone()
            for n, c in weights.items():
                if n in layer.deltas:
                    w += c * layer.weight_delta([n])["weight"].double()
            ref.get_submodule(path).weight.copy_(w)
    return ref


def test_per_row_weights_equal_the_weighted_sum_of_deltas():
    m = _two_loras()
    x = torch.randn(3, 6, dtype=torch.float64)
    rows = [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, {"a": 0.25, "b": -0.5}]
    w = torch.tensor([[r["a"], r["b"]] for r in rows], dtype=torch.float64)
    with dk.routed(m, ["a", "b"], w):
        y = m(x)
    for i, r in enumerate(rows):
        torch.testing.assert_close(y[i], _merged_reference(m, r)(x[i:i + 1])[0], rtol=1e-6, atol=1e-6)


def test_one_hot_weights_equal_the_adapter_alone_and_zero_weights_the_base():
    m = _two_loras()
    x = torch.randn(4, 6, dtype=torch.float64)
    dk.set_active(m, ["b"])
    alone = m(x)
    dk.set_active(m, [])
    base = m(x)
    with dk.routed(m, ["a", "b"], torch.tensor([[0.0, 1.0]] * 4, dtype=torch.float64)):
        torch.testing.assert_close(m(x), alone, rtol=0, atol=1e-12)
    with dk.routed(m, ["a", "b"], torch.zeros(4, 2, dtype=torch.float64)):
        torch.testing.assert_close(m(x), base, rtol=0, atol=0)


def test_per_token_weights_equal_routing_each_token_on_its_own():
    m = _two_loras()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    w = torch.rand(2, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with dk.routed(m, ["a", "b"], w):
        y = m(x)
    for i in range(2):
        for t in range(5):
            with dk.routed(m, ["a", "b"], w[i, t][None]):
                torch.testing.assert_close(y[i, t], m(x[i, t][None])[0], rtol=0, atol=1e-12)


def test_a_callable_gets_each_layer_and_its_input():
    m = _two_loras()
    x = torch.randn(2, 6, dtype=torch.float64)
    seen = []

    def fn(layer, h):
        seen.append((layer, tuple(h.shape)))
        # layer "0": all on b; layer "2": a at 0.5 (b does not touch it)
        first = layer is m.get_submodule("0")
        return torch.tensor([[0.0, 1.0] if first else [0.5, 0.0]] * h.shape[0], dtype=h.dtype)

    with dk.routed(m, ["a", "b"], fn):
        y = m(x)
    assert seen == [(m.get_submodule("0"), (2, 6)), (m.get_submodule("2"), (2, 5))]
    ref = _mlp()
    with torch.no_grad():
        l0, l2 = m.get_submodule("0"), m.get_submodule("2")
        ref[0].weight.copy_(l0.base_params()["weight"] + l0.weight_delta(["b"])["weight"].double())
        ref[2].weight.copy_(l2.base_params()["weight"] + 0.5 * l2.weight_delta(["a"])["weight"].double())
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)


def test_methods_without_a_batched_path_sum_their_weighted_changes():
    """LoHa has no routed_residual: the layer runs each adapter and weights its output change."""
    from deltakit.methods.loha import LohaConfig
    m = _mlp()
    dk.attach(m, LohaConfig(r=2, targets=["0", "2"]), name="p")
    dk.attach(m, LohaConfig(r=2, targets=["0", "2"]), name="q")
    _randomise(m, "p", "q")
    x = torch.randn(2, 6, dtype=torch.float64)
    with dk.routed(m, ["p", "q"], torch.tensor([[0.3, 0.7], [0.3, 0.7]], dtype=torch.float64)):
        y = m(x)
    torch.testing.assert_close(y, _merged_reference(m, {"p": 0.3, "q": 0.7})(x), rtol=1e-6, atol=1e-6)


def test_multi_head_weights_split_each_rank_into_blocks():
    m = _mlp()
    dk.attach(m, LoraConfig(r=4, targets=["0"], alpha=4.0), name="a")
    _randomise(m, "a")
    x = torch.randn(2, 6, dtype=torch.float64)
    layer = m.get_submodule("0")
    full = torch.ones(2, 1, 2, dtype=torch.float64)
    with dk.routed(m, ["a"], full, heads=2):
        y_all = m(x)
    dk.set_active(m, ["a"])
    torch.testing.assert_close(y_all, m(x), rtol=0, atol=1e-12)
    dk.set_active(m, [])
    # head 0 (rank rows 0-1) at weight 1, head 1 (rows 2-3) off: the LoRA with B's columns 2-3 zeroed
    d = layer.deltas["a"]
    dw = d.scale * d.lora_B[:, :2].detach() @ d.lora_A[:2].detach()
    ref = _mlp()
    with torch.no_grad():
        ref[0].weight.add_(dw)
    with dk.routed(m, ["a"], torch.tensor([[[1.0, 0.0]]] * 2, dtype=torch.float64), heads=2):
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=1e-12)


def test_gradients_reach_the_weights():
    m = _two_loras()
    x = torch.randn(3, 6, dtype=torch.float64)
    logits = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    with dk.routed(m, ["a", "b"], logits.softmax(-1)):
        m(x).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bad_routing_gives_one_line_errors():
    m = _two_loras()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(KeyError, match="unknown: \\['c'\\]"):
        with dk.routed(m, ["a", "c"], torch.ones(3, 2)):
            pass
    with pytest.raises(ValueError, match=r"must be \(B\[, T\], 2\); got \(3, 3\)"):
        with dk.routed(m, ["a", "b"], torch.ones(3, 3)):
            pass
    with dk.routed(m, ["a", "b"], torch.ones(4, 2, dtype=torch.float64)):
        with pytest.raises(DeltaStateError, match=r"lead with \(4,\), the layer's input is \(3, 6\)"):
            m(x)
    with pytest.raises(ValueError, match="ranks divisible"):
        with dk.routed(m, ["a", "b"], torch.ones(3, 2, 2, dtype=torch.float64), heads=2):
            m(x)
    dk.get_adapter(m, "a").merge()
    with dk.routed(m, ["a", "b"], torch.ones(3, 2, dtype=torch.float64)):
        with pytest.raises(DeltaStateError, match="unmerged"):
            m(x)


def test_threads_route_independently():
    m = _two_loras()
    x = torch.randn(2, 6, dtype=torch.float64)
    want = {0: _merged_reference(m, {"a": 1.0})(x), 1: _merged_reference(m, {"b": 1.0})(x)}
    got, barrier = {}, threading.Barrier(2)

    def worker(k):
        w = torch.zeros(2, 2, dtype=torch.float64)
        w[:, k] = 1.0
        with dk.routed(m, ["a", "b"], w):
            barrier.wait()
            got[k] = [m(x) for _ in range(20)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        for y in got[k]:
            torch.testing.assert_close(y, want[k], rtol=1e-6, atol=1e-6)


def test_generation_with_a_per_layer_router_on_a_tiny_llama():
    """A per-layer callable sees (B, T, d) at prefill and (B, 1, d) per decoded token; with all
    weight on one adapter, generation equals that adapter's."""
    m = make_model("llama")
    dk.attach(m, LoraConfig(r=2, targets=["q_proj", "v_proj"]), name="a")
    dk.attach(m, LoraConfig(r=4, targets=["v_proj", "down_proj"]), name="b")
    _randomise(m, "a", "b")
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    dk.set_active(m, ["b"])
    want = m.generate(ids, max_new_tokens=4, do_sample=False)
    dk.set_active(m, [])
    shapes = set()

    def fn(layer, h):
        shapes.add(h.shape[1])
        return torch.tensor([0.0, 1.0]).expand(*h.shape[:-1], 2)

    with dk.routed(m, ["a", "b"], fn):
        got = m.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want) and shapes == {5, 1}


def test_the_stacked_factor_cache_sees_in_place_updates():
    """Without autograd the concatenated factors are cached; an in-place change of a factor
    (an optimiser step between two evaluations) must not be served from the cache."""
    m = _two_loras()
    x = torch.randn(2, 6, dtype=torch.float64)
    w = torch.tensor([[0.5, 0.5]] * 2, dtype=torch.float64)
    with torch.no_grad(), dk.routed(m, ["a", "b"], w):
        first = m(x)
        assert torch.equal(m(x), first)                       # a cache hit gives the same numbers
        dk.get_adapter(m, "b").parameters().__next__().mul_(2.0)
        changed = m(x)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, _merged_reference(m, {"a": 0.5, "b": 0.5})(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scope", ["mixed", "routed"])
def test_detach_drops_the_batched_paths_factor_caches(scope):
    """Mixed and routed forwards cache stacked factors on the base modules (no autograd); a
    detached adapter's tensors must not stay alive in them (a server's unload must free)."""
    import gc
    import weakref

    m = _mlp()
    dk.attach(m, LoraConfig(r=2, targets=["0", "2"], alpha=4.0), name="a")
    dk.attach(m, LoraConfig(r=3, targets=["0"], alpha=3.0), name="b")
    _randomise(m, "a", "b")
    refs = [weakref.ref(p) for p in dk.get_adapter(m, "a").parameters()]
    x = torch.randn(3, 6, dtype=torch.float64)
    ctx = (dk.mixed_batch(m, ["a", "b", None]) if scope == "mixed"
           else dk.routed(m, ["a", "b"], torch.full((3, 2), 0.5, dtype=torch.float64)))
    with torch.no_grad(), ctx:
        m(x)
    cached = [k for mod in m.modules() for k in mod.__dict__ if k.startswith("_dk_cache_")]
    assert cached, "the batched path kept no cache: this test would prove nothing"
    dk.detach(m, "a")
    gc.collect()
    assert refs and all(r() is None for r in refs)
    assert not [k for mod in m.modules() for k in mod.__dict__ if k.startswith("_dk_cache_")
                and mod is m[0]]  # layer 0 had "a": its caches are gone
