"""``fit(compile=True)``: the training forward goes through ``compile_model`` (torch.compile) and
trains the same parameters to the same values (to float rounding); a compiler failure is a one-line error.

The tests compile with dynamo's ``eager`` backend (graph capture without inductor's C++ code
generation, seconds instead of minutes on a loaded CPU): what is tested here is fit's wiring,
not inductor. The LLM benchmark (bench/bench_llm.py) times the real inductor path.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

import deltakit as dk
from deltakit.train import fit, loop
from tests.train.test_causal_lm import tiny_llama


def _rows(n: int = 8, seq: int = 10):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 48, (n, seq), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def _model():
    model = tiny_llama()
    dk.attach(model, dk.LoraConfig(r=4, targets=("q_proj", "v_proj", "down_proj")))
    return model


@pytest.mark.slow  # dynamo traces the model: ~35 s of CPU
def test_compile_trains_the_same_parameters_to_the_same_values(monkeypatch):
    calls = []

    def compile_eager(model, **options):
        calls.append(model)
        return torch.compile(model, backend="eager")

    monkeypatch.setattr(loop, "compile_model", compile_eager)
    eager, compiled = _model(), _model()
    kw = dict(lr=1e-2, max_steps=2, log_every=1, progress=False, seed=0)
    a = fit(eager, DataLoader(_rows(), batch_size=4), **kw)
    b = fit(compiled, DataLoader(_rows(), batch_size=4), compile=True, **kw)
    assert calls == [compiled]                          # the forward really went through the compiler
    # the same maths; traced graphs may order float reductions differently, so to rounding
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-5)
    pa, pb = dict(eager.named_parameters()), dict(compiled.named_parameters())
    moved = [n for n, p in pa.items() if p.requires_grad and not torch.equal(p, _model().get_parameter(n))]
    assert moved                                        # training changed the adapter...
    for n in moved:                                     # ...to the same values
        torch.testing.assert_close(pb[n], pa[n], rtol=1e-5, atol=1e-6)


def test_a_compiler_failure_is_a_one_line_error_naming_the_option(monkeypatch):
    from torch._dynamo.exc import Unsupported

    def broken(model, **options):
        def call(**batch):
            raise Unsupported("a graph the compiler cannot take\nmore lines")
        return call

    monkeypatch.setattr(loop, "compile_model", broken)
    with pytest.raises(RuntimeError, match=r"^fit\(compile=True\): torch.compile failed \(Unsupported: "
                                           r"a graph the compiler cannot take\); train without compile$"):
        fit(_model(), DataLoader(_rows(), batch_size=4), max_steps=1, progress=False, compile=True)


def test_errors_of_the_model_itself_pass_through_unchanged(monkeypatch):
    monkeypatch.setattr(loop, "compile_model", lambda model, **o: (lambda **b: (_ for _ in ()).throw(KeyError("x"))))
    with pytest.raises(KeyError):
        fit(copy.deepcopy(_model()), DataLoader(_rows(), batch_size=4), max_steps=1, progress=False, compile=True)


@pytest.mark.slow  # dynamo traces the model a few times: ~30 s of CPU
def test_compiled_model_has_one_graph_and_still_obeys_per_call_scopes():
    # ModelState.call() reads the per-call ContextVar only while some call scope is open, so
    # dynamo traces a LoRA model whole; opening a scope (disabled, mixed_batch) fails the guard
    # on that count and the compiled model takes the routing path: the outputs stay right.
    model = _model()
    dk.attach(model, dk.LoraConfig(r=4, targets=("q_proj", "v_proj", "down_proj")), name="other")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("default", "other"):
            for p in dk.get_adapter(model, name).parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    dk.set_active(model, "default")
    ids = torch.randint(5, 48, (3, 7), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(input_ids=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, plain, rtol=1e-5, atol=1e-6)
        with dk.disabled(model):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
            base = model(input_ids=ids).logits
        rows = ["default", None, "other"]
        with dk.mixed_batch(model, rows):
            mixed = compiled(input_ids=ids).logits
        dk.set_active(model, "other")
        other = model(input_ids=ids).logits
        dk.set_active(model, "default")
    assert not torch.allclose(base, plain) and not torch.allclose(other, plain)   # three different outputs
    # the mixed path stacks the factors: equal to float rounding, as in eager
    torch.testing.assert_close(mixed, torch.stack([plain[0], base[1], other[2]]), rtol=1e-4, atol=1e-5)
