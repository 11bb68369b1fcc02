"""Compressed at rest: a task vector written by ``deltakit compress`` is registered like an
adapter directory (the kind read from its manifest), served through ``attach_compressed``,
batched with ordinary adapters, moved to the host tier and back, listed with its codec and
stored bytes, counted in the tier gauges, and held to the same path rules."""
from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import deltakit as dk
from deltakit.compress.api import DeltaSource, compress
from deltakit.compress.apply import attach_compressed
from deltakit.compress.container import load_compressed
from deltakit.core.fingerprint import model_fingerprint
from deltakit.serve.engine import Engine, Limits, Request
from deltakit.serve.residency import PathNotAllowed, Residency
from deltakit.taskvec import TaskVector
from deltakit.train.generate import generate_ids
from tests.serve.helpers import randomize, save_adapters, tiny_lm

PAD, EOS, KEY = 0, 4, "sk-test"
PROMPTS = [[5, 9, 13, 40], [50, 51, 52], [12, 33, 6, 7], [11, 30, 31]]
#: svd rank 4 in float16 of the LoRA's four targets: q_proj (16, 16) and v_proj (8, 16) in 2 layers,
#: (out * 4 + 4 * in) * 2 bytes each
STORED = 2 * ((16 * 4 + 4 * 16) * 2 + (8 * 4 + 4 * 16) * 2)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """An adapter directory ``a`` and a compressed rank-4 LoRA ``z`` (svd, rank 4) under one root,
    plus a reference model with both attached in-process (``a`` from its files, ``z`` by
    ``attach_compressed`` of the compressed file)."""
    root = tmp_path_factory.mktemp("compressed-root")
    model, _ = tiny_lm()
    paths = save_adapters(model, root, {"a": 2})
    base_fp = model_fingerprint(model)
    ad = dk.attach(model, dk.LoraConfig(r=4), name="z")
    randomize(ad, 7)
    compress(DeltaSource(TaskVector.from_adapter(ad), base_fp), root / "z", codec="svd", knobs={"rank": 4})
    dk.detach(model, "z")
    ref, tok = tiny_lm()
    dk.load_adapter(ref, paths["a"], name="a", activate=False)
    attach_compressed(ref, load_compressed(root / "z").task_vector(), name="z", activate=False)
    return root, paths["a"], root / "z", ref, tok


def _alone(ref, prompt, adapter, n=10) -> list[int]:
    return generate_ids(ref, [prompt], adapters=[adapter], max_new_tokens=n, pad_token_id=PAD, eos_token_id=[EOS])[0]


def _submit(engine, res, prompt, name):
    events: list = []
    key = res.acquire(name).key if name is not None else None
    r = Request(prompt=prompt, adapter=key, max_tokens=10, sink=events.append)
    engine.submit(r)
    return r, events


def _run(engine, res, plan):
    jobs = [_submit(engine, res, p, n) for p, n in plan]
    for _ in range(200):
        if all(r.finished for r, _ in jobs):
            break
        engine.step()
    return [[e.token for e in ev if e.kind == "token"] for _, ev in jobs]


def test_a_compressed_adapter_batches_with_an_ordinary_one_and_each_equals_itself_alone(stored):
    root, a_dir, z_dir, ref, _ = stored
    alone = {n: [_alone(ref, p, n) for p in PROMPTS] for n in ("a", "z", None)}
    assert alone["z"] != alone["a"] and alone["z"] != alone[None]      # z really changes the outputs
    model, _ = tiny_lm()
    res = Residency(model, roots=[root], capacity=1, host_capacity=2)
    res.register("z", z_dir), res.register("a", a_dir)
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, residency=res, prefetch=2,
                    limits=Limits(max_batch=4))
    plan = [(PROMPTS[0], "z"), (PROMPTS[1], "a"), (PROMPTS[2], None), (PROMPTS[3], "z")]
    got = _run(engine, res, plan)                                  # one batch: z, a and the base rows together
    assert got == [alone[n][PROMPTS.index(p)] for p, n in plan]
    res.ensure(res.resolve("a").key)                               # a used last: with capacity 1 z goes to host
    res.trim()
    kz = res.resolve("z").key
    assert res.tier(kz) == "host" and res.tiers_by_kind() == {("host", "compressed"): 1, ("device", "adapter"): 1}
    before = res.loads["host"]
    again = _run(engine, res, [(PROMPTS[1], "z"), (PROMPTS[2], "a")])   # z back from its host copy
    assert again == [alone["z"][1], alone["a"][2]] and res.loads["host"] == before + 1
    engine.close()


def test_served_over_http_listed_with_codec_and_bytes_and_counted_in_the_tier_gauge(stored):
    from deltakit.serve.server import LiveServer, ServeOptions, build_app
    root, a_dir, z_dir, ref, tok = stored
    model, _ = tiny_lm()
    opts = ServeOptions(adapters={"a": str(a_dir), "z": str(z_dir)}, adapter_dirs=[str(root)], api_key=KEY,
                        limits=Limits(max_batch=4, max_tokens=16, max_prompt=32, timeout=30), resident=4)
    head = {"Authorization": f"Bearer {KEY}"}
    with LiveServer(build_app(model, tok, "tiny", opts)) as srv, httpx.Client(base_url=srv.url, headers=head,
                                                                              timeout=30) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "z2", "lora_path": "z"})
        assert r.status_code == 200, r.text
        for name in ("z", "z2", "a"):
            r = http.post("/v1/completions", json={"model": name, "prompt": PROMPTS[0], "max_tokens": 10,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            want = _alone(ref, PROMPTS[0], "z" if name != "a" else "a")
            assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        rows = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        f = load_compressed(z_dir)
        label = next(iter({x.label for x in f.records.values()}))
        assert label.startswith("svd(") and "rank=4" in label
        for name in ("z", "z2"):
            assert rows[name]["kind"] == "compressed" and rows[name]["codec"] == label
            assert rows[name]["stored_bytes"] == f.total_bytes == STORED == 896
        assert rows["a"]["kind"] == "adapter" and rows["a"]["codec"] is None
        assert rows["a"]["stored_bytes"] == (a_dir / "adapter.safetensors").stat().st_size
        gauges = _gauges(http.get("/metrics").text)
        assert gauges[("deltakit_resident_adapters_by_kind", "device", "compressed")] == 2
        assert gauges[("deltakit_resident_adapters_by_kind", "device", "adapter")] == 1
        assert gauges[("deltakit_resident_adapters", "device")] == 3


def _gauges(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("deltakit_resident_adapters"):
            for s in fam.samples:
                out[(s.name, s.labels["tier"], *([s.labels["kind"]] if "kind" in s.labels else []))] = s.value
    return out


def test_compressed_directories_follow_the_same_path_rules(stored, tmp_path):
    root, _, z_dir, _, _ = stored
    model, _ = tiny_lm()
    outside = tmp_path / "outside"
    shutil.copytree(z_dir, outside / "z")
    res = Residency(model, roots=[root])
    with pytest.raises(PathNotAllowed, match="outside the adapter directories"):
        res.register("x", outside / "z")
    link = root / "escape-z"
    os.symlink(outside / "z", link)                                   # a link from inside to outside
    try:
        with pytest.raises(PathNotAllowed, match="outside the adapter directories"):
            res.register("x", "escape-z")
    finally:
        link.unlink()
    evil = root / "evil-z"                                            # an index naming a file outside
    evil.mkdir()
    shutil.copy(z_dir / "deltakit.json", evil / "deltakit.json")
    keys = load_compressed(z_dir).records
    weight_map = {k: str(outside / "z" / "model.safetensors") for r in keys.values() for k in r.parts.values()}
    (evil / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    try:
        with pytest.raises(PathNotAllowed, match="index names a tensor file outside"):
            res.register("x", evil)
    finally:
        shutil.rmtree(evil)
    junk = root / "junk"                                              # neither kind: a one-line error
    junk.mkdir()
    try:
        with pytest.raises(FileNotFoundError, match="expected an adapter directory .* or a compressed task vector"):
            res.register("x", junk)
    finally:
        junk.rmdir()
    assert res.register("ok", "z").startswith("ok~")                  # relative to a root: fine
