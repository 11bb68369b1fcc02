"""The engine as a Ray Serve application (issue 17 item 5): one local Ray for the module
(2 CPUs, no dashboard, 127.0.0.1), the router and two engine replicas of the tiny Llama with the
three saved adapters; requests go through HTTP with the openai client. Checked: greedy answers
equal each request decoded alone on the model (streaming and not, every adapter and the base),
and Ray's multiplexing routes a request to the replica that already holds its adapter."""
from __future__ import annotations

import socket
import time

import pytest

from tests.serve.conftest import KEY
from tests.serve.helpers import tiny_lm

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

BASE = "tiny-llama"
PROMPTS = ["w1 w2 w3", "w7 w8", "w30 w31 w32 w33 w34"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(adapter_root, tmp_path_factory):
    """(base url, seconds to start): Ray, Serve's proxy and both replicas up; all shut down after."""
    from ray import serve

    from deltakit.serve.engine import Limits
    from deltakit.serve.ray_app import ray_application, start_on_ray
    from deltakit.serve.server import ServeOptions

    base = tmp_path_factory.mktemp("ray-base")
    model, tok = tiny_lm()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    root, paths = adapter_root
    opts = ServeOptions(adapters={n: str(p) for n, p in paths.items()}, api_key=KEY, resident=2, host_resident=4,
                        limits=Limits(max_batch=4, max_queue=8, max_tokens=32, max_prompt=48, timeout=60))
    port = _free_port()
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        start_on_ray(ray_application(str(base), BASE, opts, replicas=2, threads=1),
                     address=None, host="127.0.0.1", port=port)
        yield f"http://127.0.0.1:{port}", time.monotonic() - t0
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_client(ray_server):
    import openai
    return openai.OpenAI(base_url=f"{ray_server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def _complete(client, model: str, prompt: str, n: int):
    """(text, replica id, whether the adapter was resident before) of one greedy completion."""
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return raw.parse().choices[0].text, raw.headers["x-deltakit-replica"], raw.headers["x-deltakit-adapter-resident"]


@pytest.mark.parametrize("argv, message", [
    (["serve", "x", "--ray-address", "auto"], "--ray-address: expected --ray-replicas N with it, found none"),
    (["serve", "x", "--ray-replicas", "0"], "--ray-replicas: expected >= 1, found 0"),
])
def test_ray_flags_fail_in_one_line(argv, message, capsys):
    from deltakit.cli import main
    assert main(argv) == 1
    assert capsys.readouterr().err == f"deltakit serve: error: {message}\n"


def test_requests_go_to_the_replica_holding_their_adapter(ray_client, reference, ray_server):
    print(f"Ray, Serve and 2 replicas up in {ray_server[1]:.1f} s")
    home = {}
    for name in ("a", "b", "c"):   # cold: each attached on first use, by the replica Ray picks
        text, replica, resident = _complete(ray_client, name, PROMPTS[0], 8)
        assert text == reference.completion(PROMPTS[0], name, 8) and resident == "no"
        home[name] = replica
        time.sleep(1.0)  # the replica reports its adapters to Serve's routers every 0.1 s
    # with a held, b goes to a replica holding the fewest adapters: the other one
    assert home["a"] != home["b"]
    for prompt in PROMPTS[1:]:       # warm: always the replica that holds the adapter
        for name in ("a", "b", "c"):
            text, replica, resident = _complete(ray_client, name, prompt, 8)
            assert (replica, resident) == (home[name], "yes"), name
            assert text == reference.completion(prompt, name, 8)


def test_base_streaming_and_errors_through_ray(ray_client, reference):
    import openai
    got = ray_client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert got.choices[0].text == reference.completion(PROMPTS[0], None, 10)
    chunks = list(ray_client.completions.create(model="b", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                                stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference.completion(PROMPTS[1], "b", 10)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ray_client.completions.create(model="nope", prompt=PROMPTS[0], max_tokens=2)
    with pytest.raises(openai.APIStatusError) as e:
        ray_client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "y"}, cast_to=object)
    assert e.value.status_code == 501
