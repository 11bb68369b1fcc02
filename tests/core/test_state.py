"""One model state, per-call routing in a context (issue: core seams, item 1)."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import deltakit as dk
from deltakit.core.adapter import model_state
from tests.conftest import make_input, make_model, run


def _two(kind="bert", r=2):
    m = make_model(kind).eval()
    for name, seed in (("a", 1), ("b", 2)):
        ad = dk.attach(m, dk.LoraConfig(r=r), name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in ad.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _alone(m, name, x):
    prev = dk.active(m)
    dk.set_active(m, [name] if name else [])
    try:
        return run(m, x)
    finally:
        dk.set_active(m, prev)


def test_detach_removes_the_adapter_from_the_active_set_and_merge_and_detach_works():
    m = _two()
    x = make_input("bert")
    ref_a = _alone(m, "a", x)
    dk.set_active(m, ["a", "b"])
    dk.detach(m, "b")
    assert dk.active(m) == ["a"]
    dk.merge_and_detach(m)                       # was: KeyError for the stale "b"
    assert model_state(m) is None and not dk.adapters(m)
    assert torch.allclose(run(m, x), ref_a, atol=1e-5)


def test_nested_disabled_restores_the_outer_block():
    m = _two()
    x = make_input("bert")
    with dk.disabled(m):
        base = run(m, x)
    dk.set_active(m, ["a"])
    with dk.disabled(m):
        with dk.disabled(m):
            pass
        assert torch.equal(run(m, x), base)      # was: re-enabled after the inner block
    assert not torch.allclose(run(m, x), base)


def test_disabled_on_one_model_leaves_another_alone():
    m1, m2 = _two(), _two()
    x = make_input("bert")
    with_adapter = run(m2, x)
    with dk.disabled(m1):
        assert torch.equal(run(m2, x), with_adapter)


def test_merge_order_is_state_and_unmerge_is_exact():
    m = _two()
    x = make_input("bert")
    with dk.disabled(m):
        base = run(m, x)
    weights = {k: v.clone() for k, v in m.state_dict().items() if "base." in k}
    dk.get_adapter(m, "a").merge()
    dk.get_adapter(m, "b").merge()
    assert model_state(m).merged == ("a", "b")
    dk.get_adapter(m, "a").unmerge()
    assert model_state(m).merged == ("b",)
    dk.set_active(m, ["b"])
    dk.get_adapter(m, "b").unmerge()
    assert model_state(m).merged == ()
    after = {k: v for k, v in m.state_dict().items() if "base." in k}
    assert all(torch.equal(weights[k], after[k]) for k in weights)  # bit-exact originals
    with dk.disabled(m):
        assert torch.equal(run(m, x), base)


def test_state_is_one_object_shared_by_every_layer():
    m = _two()
    state = model_state(m)
    layers = [mod for mod in m.modules() if isinstance(mod, dk.DeltaLayer)]
    assert layers and all(layer.state is state for layer in layers)
    assert not any(hasattr(layer, attr) for layer in layers for attr in ("active", "rows", "disabled"))


def test_deepcopy_gets_its_own_state():
    m = _two()
    c = copy.deepcopy(m)
    assert model_state(c) is not model_state(m)
    assert all(mod.state is model_state(c) for mod in c.modules() if isinstance(mod, dk.DeltaLayer))
    dk.set_active(c, ["b"])
    assert dk.active(m) == ["b"] and dk.active(c) == ["b"]
    dk.detach(c, "b")
    assert dk.active(c) == [] and sorted(dk.adapters(m)) == ["a", "b"]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_threads_running_mixed_batches_each_see_their_own_rows(kind):
    m = _two(kind)
    x = make_input(kind, batch=4)
    choices = ["a", "b", None]
    refs = {n: _alone(m, n, x) for n in choices}
    errors: list[str] = []
    start = threading.Barrier(6)

    def worker(t: int):
        g = torch.Generator().manual_seed(t)
        start.wait()
        for it in range(15):
            rows = [choices[i] for i in torch.randint(0, 3, (4,), generator=g).tolist()]
            with torch.no_grad(), dk.mixed_batch(m, rows):
                out = run(m, x)
            for i, n in enumerate(rows):
                if not torch.allclose(out[i], refs[n][i], atol=1e-5):
                    errors.append(f"thread {t} iteration {it} row {i}: expected adapter {n}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_detach_waits_for_a_forward_in_flight():
    """A state change waits for the model's forwards in flight; the forward sees one state."""
    m = _two()
    x = make_input("bert")
    dk.set_active(m, ["a", "b"])
    expected = run(m, x)
    entered, release = threading.Event(), threading.Event()
    layer = next(mod for mod in m.modules() if isinstance(mod, dk.DeltaLayer))
    hook = layer.register_forward_pre_hook(lambda *a: (entered.set(), release.wait(10)) and None)
    result = {}
    t = threading.Thread(target=lambda: result.update(out=run(m, x)))
    t.start()
    assert entered.wait(10)
    detacher = threading.Thread(target=dk.detach, args=(m, "b"))
    detacher.start()
    detacher.join(0.3)
    assert detacher.is_alive() and sorted(dk.adapters(m)) == ["a", "b"]  # waiting for the forward
    release.set()
    t.join(10)
    detacher.join(10)
    hook.remove()
    assert torch.allclose(result["out"], expected, atol=1e-6) and sorted(dk.adapters(m)) == ["a"]


def test_a_failed_forward_releases_the_guard_and_hooks_go_with_the_last_adapter():
    m = _two()
    with pytest.raises(Exception):
        m(input_ids=torch.full((1, 4), 999))        # index out of range inside the forward
    dk.detach(m, "a")                                # would hang if the failed forward kept its read
    dk.detach(m, "b")
    assert not m._forward_pre_hooks and not m._forward_hooks


def test_deepcopy_hooks_belong_to_the_copy():
    m = _two()
    c = copy.deepcopy(m)
    dk.detach(c, "a")
    dk.detach(c, "b")
    assert not c._forward_pre_hooks and len(m._forward_pre_hooks) == 1
    x = make_input("bert")
    run(m, x)
    dk.detach(m, "a")
