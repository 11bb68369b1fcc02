"""The live server through the official openai client: completions and chat, streaming and not,
equal to each request decoded alone; mixed adapters at once; load / unload; every error status;
metrics counted per adapter; cancel on disconnect; graceful shutdown drains."""
from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import BASE, KEY, start_server

PROMPTS = ["w1 w2 w3", "w7 w8", "w30 w31 w32 w33 w34", "w11"]
CHAT = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w5 w6 w7"}]


def _engine(server):
    return server.config.app.state.service.engine


def _counters(server) -> dict[tuple, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_models_lists_the_base_and_adapters(client):
    rows = {m.id: m for m in client.models.list().data}
    assert set(rows) == {BASE, "a", "b", "c"}
    assert rows["a"].parent == BASE and rows[BASE].parent is None
    assert rows["b"].model_extra["tier"] in ("device", "host", "disk") and "lineage" in rows["c"].model_extra


@pytest.mark.parametrize("model", ["a", "b", "c", BASE])
def test_completion_greedy_equals_the_request_alone_streaming_and_not(client, reference, model):
    adapter = None if model == BASE else model
    want = reference.completion(PROMPTS[0], adapter, 12)
    got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason in ("stop", "length")
    n_out = len(reference.ids([5 + 1, 5 + 2, 5 + 3], adapter, 12))   # w1 w2 w3 are ids 6, 7, 8
    assert got.usage.prompt_tokens == 3 and got.usage.completion_tokens == n_out
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_chat_streaming_and_not(client, reference):
    want = reference.chat(CHAT, "b", 10)
    got = client.chat.completions.create(model="b", messages=CHAT, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="b", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert want  # the random model says something


def test_concurrent_mixed_adapters_each_equal_alone(client, reference):
    jobs = [(p, m) for p in PROMPTS for m in ("a", "b", "c", BASE)]

    def one(job):
        p, m = job
        return client.completions.create(model=m, prompt=p, max_tokens=9, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    for (p, m), text in zip(jobs, got):
        assert text == reference.completion(p, None if m == BASE else m, 9), (p, m)


def test_seeded_sampling_reproduces(client):
    kw = {"model": "c", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 1.5, "top_p": 0.95, "seed": 3}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_error_statuses(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="w1", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens between 1 and 64, found 65"):
        client.completions.create(model="a", prompt="w1", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="prompt of 1 to 48 tokens"):
        client.completions.create(model="a", prompt=" ".join(["w1"] * 49), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.completions.create(model="a", prompt="w1", max_tokens=2, n=2)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w1"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "model" in r.json()["error"]["message"]


def test_queue_full_is_429_and_metrics_count_per_adapter(adapter_root):
    srv = start_server(adapter_root, max_batch=1, max_queue=1)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=30)
        engine = _engine(srv)
        first = client.completions.create(model="a", prompt="w1", max_tokens=60, temperature=0, stream=True)
        _until(lambda: engine.running == 1)
        second = client.completions.create(model="b", prompt="w2", max_tokens=5, temperature=0, stream=True)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="c", prompt="w3", max_tokens=5)
        n_first, n_second = sum(1 for _ in first), sum(1 for _ in second)
        client.completions.create(model="a", prompt="w4 w5", max_tokens=7, temperature=0)
        m = _counters(srv)
        assert m[("deltakit_requests_total", ("adapter", "c"), ("status", "429"))] == 1
        assert m[("deltakit_requests_total", ("adapter", "b"), ("status", "length"))] + \
            m.get(("deltakit_requests_total", ("adapter", "b"), ("status", "stop")), 0) == 1
        done_a = sum(v for k, v in m.items() if k[0] == "deltakit_requests_total" and ("adapter", "a") in k)
        assert done_a == 2, {k: v for k, v in m.items() if ("adapter", "a") in k}
        assert m[("deltakit_tokens_total", ("adapter", "a"), ("kind", "prompt"))] == 1 + 2
        assert m[("deltakit_request_latency_seconds_count", ("adapter", "a"))] == 2
        assert m[("deltakit_queue_depth",)] == 0 and ("deltakit_resident_adapters", ("tier", "device")) in m
        assert n_first >= 2 and n_second >= 2
    finally:
        srv.stop()


def _until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_load_and_unload(client, server, reference):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "c"}, headers=headers)
    assert r.status_code == 200 and "added" in r.text
    assert "d" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="d", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert got == reference.completion(PROMPTS[2], "c", 8)
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "a"}, headers=headers)
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "a",
                                                                "load_inplace": True}, headers=headers)
    got = client.completions.create(model="d", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert r.status_code == 200 and got == reference.completion(PROMPTS[2], "a", 8)   # not the stale c
    for bad in ("../x", "/etc", "a/../../"):
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": bad},
                       headers=headers)
        assert r.status_code == 400, bad
    stream = client.completions.create(model="d", prompt=PROMPTS[3], max_tokens=40, temperature=0, stream=True)
    it = iter(stream)
    first = next(it).choices[0].text                            # d is generating ...
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "d"}, headers=headers)
    assert r.status_code == 200                                 # ... when it is unloaded
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="d", prompt="w1", max_tokens=2)
    rest = "".join(c.choices[0].text for c in it)
    assert first + rest == reference.completion(PROMPTS[3], "a", 40)   # the running request is untouched
    _until(lambda: not any(k.startswith("d~") for k in server.config.app.state.service.residency.attached()))
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "d"}, headers=headers)
    assert r.status_code == 404
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 401


def test_disconnect_cancels_and_shutdown_drains(adapter_root, reference):
    srv = start_server(adapter_root, max_batch=2, max_tokens=120)
    engine = _engine(srv)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    # each forward >= 20 ms, so 120 tokens take >= 2.4 s: a disconnect noticed late under load
    # (two test workers, a Ray start beside) still lands before the generation could finish
    slow = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    stream = client.completions.create(model="a", prompt="w1", max_tokens=120, temperature=0, stream=True)
    next(iter(stream))
    stream.close()                                              # the client goes away mid-generation
    _until(lambda: engine.running == 0)
    m = _counters(srv)
    assert m[("deltakit_requests_total", ("adapter", "a"), ("status", "cancelled"))] == 1
    assert m[("deltakit_tokens_total", ("adapter", "a"), ("kind", "completion"))] < 120   # stopped early
    srv.config.app.state.service.disconnect_poll = 0.02
    with pytest.raises(httpx.ReadTimeout):                      # a non-streaming client that gives up
        httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.15,
                   json={"model": "c", "prompt": "w1", "max_tokens": 120, "temperature": 0})
    _until(lambda: engine.running == 0)
    m = _counters(srv)
    assert m[("deltakit_requests_total", ("adapter", "c"), ("status", "cancelled"))] == 1
    assert m[("deltakit_tokens_total", ("adapter", "c"), ("kind", "completion"))] < 120
    slow.remove()
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.completions.create, model="b", prompt="w9 w10", max_tokens=60, temperature=0)
        _until(lambda: engine.running == 1)
        srv.stop()                                              # while the request runs
        text = fut.result(timeout=30).choices[0].text
    assert text == reference.completion("w9 w10", "b", 60) and not engine.alive


def test_stop_strings_cut_the_answer_streaming_and_not(client, reference):
    ref = reference.completion(PROMPTS[0], "a", 12)
    words = ref.split(" ")
    # two consecutive words whose first occurrence is not at the start (the random model repeats itself)
    stop = next(s for k in range(1, len(words) - 1) if ref.index(s := " ".join(words[k:k + 2])) > 0)
    want = ref[:ref.index(stop)]                                # up to its first occurrence
    got = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == want and want
    assert got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == got.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_timeout_is_408_and_health(adapter_root):
    srv = start_server(adapter_root, timeout=0.005, max_tokens=120)
    try:
        assert httpx.get(f"{srv.url}/health", timeout=10).json() == {"status": "ok"}
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="b", prompt="w1", max_tokens=120, temperature=0)
        assert e.value.status_code == 408 and e.value.body["code"] == "timeout"
        m = _counters(srv)
        assert m[("deltakit_requests_total", ("adapter", "b"), ("status", "timeout"))] == 1
    finally:
        srv.stop()
    assert not srv.thread.is_alive()


def test_library_names_and_versions_over_http(adapter_root, reference, tmp_path):
    from deltakit.library import AdapterLibrary
    from deltakit.serve.server import LiveServer, ServeOptions, build_app
    from tests.serve.helpers import tiny_lm

    _, paths = adapter_root
    model, tok = tiny_lm()
    lib = AdapterLibrary(tmp_path / "lib")
    lib.add(paths["a"], model=model, name="task")
    lib.add(paths["c"], model=model, name="task", lineage=[("task@1", "retrain")])
    with LiveServer(build_app(model, tok, BASE, ServeOptions(library=str(tmp_path / "lib")))) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0, timeout=30)
        rows = {m.id: m.model_extra for m in client.models.list().data}
        assert {"task", "task@1", "task@2"} <= set(rows) and rows["task"]["version"] == 2
        assert rows["task@2"]["lineage"] == [{"parent": "task@1", "how": "retrain"}]
        for model_name, adapter in (("task@1", "a"), ("task", "c"), ("task@2", "c")):
            got = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            assert got.choices[0].text == reference.completion(PROMPTS[0], adapter, 8), model_name
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="task@3", prompt="w1", max_tokens=2)
        r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(paths["a"])})
        assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]   # no key: no loading
        counts = _counters(srv)
    assert counts[("deltakit_requests_total", ("adapter", "task@2"), ("status", "length"))] == 2
