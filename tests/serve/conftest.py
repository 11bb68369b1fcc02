"""A live server on 127.0.0.1 (uvicorn in a thread, a free port) with a tiny random Llama and
three saved LoRA adapters of ranks 2, 4 and 8; plus a reference copy of the same model for the
expected outputs (the server's model belongs to its scheduler thread)."""
from __future__ import annotations

import pytest
import torch

import deltakit as dk
from deltakit.train.generate import encode_prompts, generate_ids
from tests.serve.helpers import RANKS, save_adapters, tiny_lm

KEY = "sk-test"
BASE = "tiny-llama"


class Reference:
    """Greedy outputs of each request decoded alone on an identical model (None: the base)."""

    def __init__(self, paths):
        self.model, self.tok = tiny_lm()
        for name, p in paths.items():
            dk.load_adapter(self.model, p, name=name, activate=False)

    def ids(self, prompt: list[int], adapter: str | None, n: int) -> list[int]:
        return generate_ids(self.model, [prompt], adapters=[adapter], max_new_tokens=n,
                            pad_token_id=0, eos_token_id=[self.tok.eos_token_id])[0]

    def completions(self, jobs: list[tuple[str, str | None, int]]) -> list[str]:
        """Many ``(text, adapter, max_tokens)`` at once: one batched decode of the longest length,
        each row cut to its own (greedy: a shorter run is a prefix of a longer one)."""
        prompts = [list(self.tok(t)["input_ids"]) for t, _, _ in jobs]
        out = generate_ids(self.model, prompts, adapters=[a for _, a, _ in jobs], batch_size=len(jobs),
                           max_new_tokens=max(n for *_, n in jobs), pad_token_id=0,
                           eos_token_id=[self.tok.eos_token_id])
        return [self.tok.decode(o[:n], skip_special_tokens=True) for o, (_, _, n) in zip(out, jobs)]

    def completion(self, text: str, adapter: str | None, n: int) -> str:
        return self.tok.decode(self.ids(list(self.tok(text)["input_ids"]), adapter, n), skip_special_tokens=True)

    def chat(self, messages: list[dict], adapter: str | None, n: int) -> str:
        ids = encode_prompts(self.tok, [messages], chat=True)[0]
        return self.tok.decode(self.ids(ids, adapter, n), skip_special_tokens=True)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run: with tiny tensors on a shared machine, a second
    thread only spins (measured 12 ms vs 111 ms per decode step of 8 rows); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    model, _ = tiny_lm()
    return root, save_adapters(model, root, RANKS)


@pytest.fixture(scope="session")
def reference(adapter_root):
    return Reference(adapter_root[1])


def start_server(adapter_root, **limits):
    from deltakit.serve.engine import Limits
    from deltakit.serve.server import LiveServer, ServeOptions, build_app

    root, paths = adapter_root
    model, tok = tiny_lm()
    opts = ServeOptions(adapters={n: str(p) for n, p in paths.items()}, adapter_dirs=[str(root)], api_key=KEY,
                        limits=Limits(**{"max_batch": 4, "max_queue": 32, "max_tokens": 64, "max_prompt": 48,
                                         "timeout": 30, **limits}), resident=2, host_resident=4)
    return LiveServer(build_app(model, tok, BASE, opts)).start()


@pytest.fixture(scope="module")
def server(adapter_root):
    srv = start_server(adapter_root)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
