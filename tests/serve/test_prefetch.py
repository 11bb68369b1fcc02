"""Prefetch from the queue: a queued request's adapter is read from disk into the host tier before
its admission (which then only attaches it), outputs equal decoding without prefetch, a bad or
changed adapter fails its own requests only, the host capacity and pins bound what a prefetch
may evict, and /metrics counts the hits.

Deterministic: the engine is stepped by hand and each read is awaited through the future
``Residency.prefetch`` returns (the spy below records them); no sleep decides an assertion."""
from __future__ import annotations

import shutil
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

import deltakit as dk
from deltakit.serve._metrics import Metrics
from deltakit.serve.engine import Engine, Limits, Request
from deltakit.serve.residency import Residency
from deltakit.train.generate import generate_ids
from tests.serve.helpers import save_adapters, tiny_lm

PAD, EOS = 0, 4
PROMPTS = {"a": [5, 9, 13, 40], "b": [50, 51, 52], "c": [11, 30, 31]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapters a, b, c on disk and each prompt's greedy tokens decoded alone (12 new tokens)."""
    root = tmp_path_factory.mktemp("prefetch-adapters")
    model, _ = tiny_lm()
    paths = save_adapters(model, root)
    want = {}
    for name, p in paths.items():
        dk.load_adapter(model, p, name=name, activate=False)
        want[name] = generate_ids(model, [PROMPTS[name]], adapters=[name], max_new_tokens=12, pad_token_id=PAD,
                                  eos_token_id=[EOS])[0]
    assert len({tuple(v) for v in want.values()}) == 3 and all(len(v) >= 6 for v in want.values())
    return root, paths, want


class Spy:
    """Records the futures of every prefetch read the engine starts (test-side, no library hook)."""

    def __init__(self, res: Residency):
        self.futures: dict = {}
        self._orig = res.prefetch
        res.prefetch = self

    def __call__(self, keys):
        out = self._orig(keys)
        self.futures.update(out)
        return out

    def wait(self, key) -> None:
        self.futures[key].exception(timeout=30)   # done: the copy is installed or the failure recorded


def _setup(root, paths, *, prefetch: int, max_batch: int = 1, capacity: int = 1, host: int = 4,
           names=("a", "b", "c")):
    model, _ = tiny_lm()
    res = Residency(model, roots=[root], capacity=capacity, host_capacity=host)
    for n in names:
        res.register(n, paths[n])
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, residency=res, prefetch=prefetch,
                    limits=Limits(max_batch=max_batch))
    return res, engine


def _submit(engine, res, name: str, n: int = 12) -> tuple[Request, list]:
    events: list = []
    r = Request(prompt=PROMPTS.get(name, PROMPTS["c"]), adapter=res.acquire(name).key, max_tokens=n,
                sink=events.append)
    engine.submit(r)
    return r, events


def _tokens(events) -> list[int]:
    return [e.token for e in events if e.kind == "token"]


def _drain(engine, reqs, limit: int = 500) -> None:
    for _ in range(limit):
        if all(r.finished for r in reqs):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def _metric(text: str, family: str, label: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family and label in s.labels.values():
                return s.value
    raise KeyError((family, label))


def test_the_host_copy_is_there_before_admission_and_metrics_count_the_hits(saved):
    root, paths, want = saved
    res, engine = _setup(root, paths, prefetch=2)
    spy = Spy(res)
    ra, ea = _submit(engine, res, "a")
    rb, eb = _submit(engine, res, "b")
    ka, kb = ra.adapter, rb.adapter
    assert set(spy.futures) == {ka, kb}                         # both read at submission, no step yet
    spy.wait(ka), spy.wait(kb)
    assert res.tier(ka) == res.tier(kb) == "host" and res.tiers() == {"device": 0, "host": 2, "disk": 1}
    engine.step()                                              # admits a (max_batch 1); b waits in the queue
    assert res.tier(ka) == "device" and engine.queue_depth == 1 and res.tier(kb) == "host"
    _drain(engine, [ra, rb])
    assert _tokens(ea) == want["a"] and _tokens(eb) == want["b"]
    assert dict(res.loads) == {"prefetched": 2} and res.prefetches["started"] == 2
    text = Metrics(engine, res).text().decode()
    assert _metric(text, "deltakit_adapter_admissions_total", "prefetched") == 2
    assert _metric(text, "deltakit_adapter_admissions_total", "disk") == 0
    assert _metric(text, "deltakit_prefetch_reads_total", "started") == 2
    engine.close()


def test_a_request_whose_adapter_is_still_reading_waits_without_stalling_the_running_rows(saved, monkeypatch):
    root, paths, want = saved
    res, engine = _setup(root, paths, prefetch=2, max_batch=2, capacity=2)
    spy = Spy(res)
    gate = threading.Event()
    read = res._read

    def gated(src):                                            # holds c's read until the test lets it go
        if src.public == "c":
            assert gate.wait(30)
        return read(src)

    monkeypatch.setattr(res, "_read", gated)
    ra, ea = _submit(engine, res, "a")
    spy.wait(ra.adapter)
    engine.step()                                              # prefill and one decode: two tokens
    assert engine.running == 1 and len(_tokens(ea)) == 2
    rc, ec = _submit(engine, res, "c")
    for i in range(3):                                         # a decodes on; c stays queued meanwhile
        engine.step()
        assert engine.running == 1 and engine.queue_depth == 1 and res.loading(rc.adapter)
        assert len(_tokens(ea)) == 3 + i and res.tier(rc.adapter) == "disk"
    gate.set()
    spy.wait(rc.adapter)
    engine.step()                                              # now a copy only: c joins the batch
    assert engine.running == 2 and res.tier(rc.adapter) == "device"
    _drain(engine, [ra, rc])
    assert _tokens(ea) == want["a"] and _tokens(ec) == want["c"]
    assert res.loads["prefetched"] == 2 and res.loads["disk"] == 0
    engine.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_outputs_equal_decoding_without_prefetch(saved, prefetch):
    """Six requests over three adapters with one device slot and one host slot: constant
    eviction and re-reading; every request's tokens equal the adapter decoded alone."""
    root, paths, want = saved
    res, engine = _setup(root, paths, prefetch=prefetch, max_batch=2, capacity=1, host=1)
    jobs = [_submit(engine, res, n) for n in "abcacb"]
    _drain(engine, [r for r, _ in jobs])
    for (r, ev), n in zip(jobs, "abcacb"):
        assert _tokens(ev) == want[n], n
    assert sum(res.loads.values()) == 6
    if not prefetch:                                           # each adapter read once at admission
        assert dict(res.loads) == {"disk": 3, "device": 3} and not res.prefetches
    else:                                                      # how many reads win the race varies; not all lose
        assert res.prefetches["started"] >= 1 and res.loads["disk"] < 3 and res.loads["device"] == 3
    assert res.tiers()["host"] <= 1 and len(res.attached()) <= 2
    engine.close()


def test_a_bad_or_changed_adapter_fails_its_request_only(saved, tmp_path):
    root, paths, want = saved
    bad_root = tmp_path / "bad"
    for n in ("corrupt", "changed"):
        shutil.copytree(paths["c"], bad_root / n)
    model, _ = tiny_lm()
    res = Residency(model, roots=[root, bad_root], capacity=2, host_capacity=4)
    for n in "ab":
        res.register(n, paths[n])
    for n in ("corrupt", "changed"):
        res.register(n, bad_root / n)
    tensors = next((bad_root / "corrupt").glob("*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF                                           # one flipped bit in the last tensor
    tensors.write_bytes(bytes(data))
    shutil.rmtree(bad_root / "changed")                        # replaced by another adapter since registered
    shutil.copytree(paths["b"], bad_root / "changed")
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, residency=res, prefetch=4,
                    limits=Limits(max_batch=2))
    spy = Spy(res)
    jobs = {n: _submit(engine, res, n) for n in ("a", "corrupt", "b", "changed")}
    for r, _ in jobs.values():
        spy.wait(r.adapter)
    assert res.prefetches["failed"] == 2 and res.tier(jobs["a"][0].adapter) == "host"
    _drain(engine, [r for r, _ in jobs.values()])
    assert _tokens(jobs["a"][1]) == want["a"] and _tokens(jobs["b"][1]) == want["b"]
    for n, msg in (("corrupt", "does not match the manifest"), ("changed", "changed on disk since it was registered")):
        ev = jobs[n][1]
        assert [e.kind for e in ev] == ["error"] and msg in str(ev[0].error), (n, ev)
    assert engine.failure is None and res.attached() == [jobs["a"][0].adapter, jobs["b"][0].adapter]
    r, ev = _submit(engine, res, "a")                          # still serving
    _drain(engine, [r])
    assert _tokens(ev) == want["a"]
    engine.close()


def test_prefetch_respects_host_capacity_and_never_evicts_what_requests_wait_for(saved):
    root, paths, _ = saved
    model, _ = tiny_lm()
    res = Residency(model, roots=[root], capacity=1, host_capacity=1)
    k = {n: res.register(n, paths[n]) for n in "abc"}
    res.ensure(k["a"]); res.ensure(k["b"]); res.trim()         # a: LRU, evicted to the one host slot
    assert res.tier(k["a"]) == "host"
    assert set(res.prefetch([k["c"], k["a"]])) == set()       # the slot holds a, which the window wants
    started = res.prefetch([k["c"]])                           # a is wanted no more: its slot goes to c
    assert set(started) == {k["c"]}
    assert res.prefetch([k["c"]]) == {}                        # one read per key
    started[k["c"]].result(timeout=30)
    assert res.tier(k["a"]) == "disk" and res.tier(k["c"]) == "host" and res.tiers()["host"] == 1
    pinned = res.acquire("c")                                  # a queued request waits for c
    assert res.prefetch([k["a"]]) == {}                        # so a prefetch of a may not evict it
    assert res.tier(k["c"]) == "host"
    res.release(pinned.key)
    assert res.prefetches["evicted"] == 0
    res.prefetch([k["a"]])[k["a"]].result(timeout=30)
    res.close()
    assert res.prefetches["evicted"] == 1                      # c, prefetched, was pushed out unused
    assert res.prefetch([k["c"]]) == {}                        # closed: no new reads
    res.ensure(k["c"]); res.ensure(k["a"])                     # c read at admission; a from its prefetched copy
    assert dict(res.loads) == {"disk": 3, "prefetched": 1}
