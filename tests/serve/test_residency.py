"""Residency: lazy attach, LRU eviction to the host tier and back (same numbers), unload that
really frees the tensors, deferred unload under running rows, reload without stale state,
library versions, and no path outside the configured directories."""
from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch

import deltakit as dk
from deltakit.library import AdapterLibrary
from deltakit.serve.engine import Engine, Limits, Request
from deltakit.serve.residency import PathNotAllowed, Residency, UnknownAdapter
from deltakit.train.generate import generate_ids
from tests.serve.helpers import save_adapters, tiny_lm

X = torch.tensor([[5, 9, 13, 40, 7, 8]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model, _ = tiny_lm()
    paths = save_adapters(model, root)
    ref = {}
    for name, p in paths.items():                      # each adapter's logits alone, from its files
        dk.load_adapter(model, p, name=name)
        ref[name] = _logits(model, name)               # the same (mixed-batch) path the tests take:
        dk.detach(model, name)                         # bit-equal means the tiers lost nothing
    return model, root, paths, ref


def _logits(model, key):
    with torch.no_grad(), dk.mixed_batch(model, [key]):
        return model(X).logits


def _param_refs(model, key):
    return [weakref.ref(p) for p in dk.get_adapter(model, key).parameters()]


def test_lru_eviction_to_host_and_back_gives_the_same_numbers(saved):
    model, root, paths, ref = saved
    res = Residency(model, roots=[root], capacity=2, host_capacity=1)
    keys = {n: res.register(n, paths[n]) for n in "abc"}
    res.ensure(keys["a"]); res.ensure(keys["b"])
    refs = _param_refs(model, keys["a"])
    res.ensure(keys["c"]); res.trim()                   # a is the least recently used
    assert res.attached() == [keys["b"], keys["c"]] and res.tier(keys["a"]) == "host"
    gc.collect()
    assert all(r() is None for r in refs)               # detached modules are gone, not just hidden
    res.ensure(keys["a"]); res.trim()                   # back from host memory
    assert res.tier(keys["b"]) == "host" and res.tiers() == {"device": 2, "host": 1, "disk": 0}
    for n in "ac":
        torch.testing.assert_close(_logits(model, keys[n]), ref[n], rtol=0, atol=0)
    res.ensure(keys["b"]); res.trim()                   # host tier holds one: c goes to disk
    assert res.tiers() == {"device": 2, "host": 1, "disk": 0} and res.tier(keys["c"]) == "host"
    torch.testing.assert_close(_logits(model, keys["b"]), ref["b"], rtol=0, atol=0)
    for n in "abc":
        res.unregister(n)
    res.trim()
    assert dk.adapters(model) == {} and res.tiers() == {"device": 0, "host": 0, "disk": 0}


def test_unload_frees_and_is_deferred_while_rows_use_the_adapter(saved):
    model, root, paths, _ = saved
    res = Residency(model, roots=[root], capacity=4)
    res.register("a", paths["a"])
    engine = Engine(model, eos_token_ids=[4], pad_token_id=0, residency=res, limits=Limits(max_batch=2))
    got: list = []
    r = res.acquire("a")
    req = Request(prompt=[5, 9, 13], adapter=r.key, max_tokens=8, sink=got.append)
    engine.submit(req)
    engine.step()
    refs = _param_refs(model, r.key)
    res.unregister("a")                                 # while the row is running
    with pytest.raises(UnknownAdapter):
        res.acquire("a")                                # new requests no longer see it
    while not req.finished:
        engine.step()
        if not req.finished:
            assert r.key in dk.adapters(model)          # still there for the running row
    assert r.key not in dk.adapters(model)              # dropped as soon as its last row finished
    gc.collect()
    assert all(x() is None for x in refs)
    dk.load_adapter(model, paths["a"], name="ref")
    want = generate_ids(model, [[5, 9, 13]], adapters=["ref"], max_new_tokens=8, pad_token_id=0, eos_token_id=[4])
    dk.detach(model, "ref")
    assert [e.token for e in got if e.kind == "token"] == want[0]


def test_reload_under_the_same_name_serves_the_new_tensors(saved, tmp_path):
    model, root, paths, ref = saved
    res = Residency(model, roots=[root], capacity=4)
    k1 = res.register("a", paths["a"])
    res.ensure(k1)
    with pytest.raises(ValueError, match="already loaded"):
        res.register("a", paths["b"])
    k2 = res.register("a", paths["b"], replace=True)    # load_inplace: same public name, new key
    assert k2 != k1 and res.resolve("a").key == k2
    res.trim()
    res.ensure(k2)
    assert list(dk.adapters(model)) == [k2]
    torch.testing.assert_close(_logits(model, k2), ref["b"], rtol=0, atol=0)
    res.unregister("a"); res.trim()


def test_library_versions_resolve_and_never_serve_stale_state(saved, tmp_path):
    model, root, paths, ref = saved
    lib = AdapterLibrary(tmp_path / "lib")
    lib.add(paths["a"], model=model, name="task")
    lib.add(paths["b"], model=model, name="task", lineage=[("task@1", "retrain")])
    res = Residency(model, library=lib, capacity=4)
    assert res.resolve("task") == res.resolve("task@2") and res.resolve("task@1").key == "task@1"
    with pytest.raises(UnknownAdapter):
        res.resolve("task@3")
    for ver, name in ((1, "a"), (2, "b")):
        res.ensure(f"task@{ver}")
        torch.testing.assert_close(_logits(model, f"task@{ver}"), ref[name], rtol=0, atol=0)
    rows = {m["id"]: m for m in res.listing()}
    assert rows["task@2"]["lineage"] == [{"parent": "task@1", "how": "retrain"}] and rows["task@1"]["version"] == 1
    for k in ("task@1", "task@2"):
        dk.detach(model, k)


def test_no_path_outside_the_adapter_directories(saved, tmp_path):
    model, root, paths, _ = saved
    outside = tmp_path / "outside"
    outside.mkdir()
    res = Residency(model, roots=[root])
    for bad in ("../outside", str(outside), f"{root}/../outside", "a/../../outside"):
        (root.parent / "outside").mkdir(exist_ok=True)
        with pytest.raises((PathNotAllowed, FileNotFoundError)):
            res.register("x", bad)
    os.symlink(paths["a"].resolve(), outside / "link-in")          # a link from outside to inside is fine
    os.symlink(outside, root / "escape")                          # a link from inside to outside is not
    with pytest.raises(PathNotAllowed, match="outside the adapter directories"):
        res.register("x", "escape")
    evil = root / "evil"                                           # a manifest naming a file outside
    evil.mkdir()
    src_man = next(paths["a"].glob("*.json"))
    man = json.loads(src_man.read_text())
    (outside / "t.safetensors").write_bytes((paths["a"] / man["tensors"]["file"]).read_bytes())
    man["tensors"]["file"] = "../../" + outside.name + "/t.safetensors"
    (evil / src_man.name).write_text(json.dumps(man))
    with pytest.raises(PathNotAllowed, match="tensor file outside"):
        res.register("x", "evil")
    assert res.register("ok", "a").startswith("ok~")               # relative to a root: fine
    with pytest.raises(PathNotAllowed, match="no adapter directories"):
        Residency(model).register("x", paths["a"])
    with pytest.raises(ValueError, match="adapter name"):
        res.register("../a", "a")


def test_an_adapter_of_another_base_is_refused(saved, tmp_path):
    model, root, paths, ref = saved
    other, _ = tiny_lm(seed=1)
    foreign = save_adapters(other, root / "foreign", {"f": 2})["f"]
    res = Residency(model, roots=[root])
    key = res.register("f", foreign)
    with pytest.raises(dk.AdapterLoadError, match="different base model"):
        res.ensure(key)
    assert key not in dk.adapters(model)
    ok = res.register("a", paths["a"])                          # the cached fingerprint still admits its own
    res.ensure(ok)
    torch.testing.assert_close(_logits(model, ok), ref["a"], rtol=0, atol=0)
    res.unregister("a"); res.unregister("f"); res.trim()
    lax = Residency(model, roots=[root], strict_base=False)      # the operator may opt out
    key = lax.register("f", foreign)
    lax.ensure(key)
    assert key in dk.adapters(model)
    lax.unregister("f"); lax.trim()
    assert dk.adapters(model) == {}
