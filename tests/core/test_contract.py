"""The contract every registered method joins automatically.

For each (method, model) pair: merged == unmerged, unmerge restores the base,
save/load round-trips, disabled == base, only adapter parameters get gradients,
mixed batches == per-row results, detach restores the module tree.
"""
from __future__ import annotations

import pytest
import torch

import deltakit as dk
from deltakit.core.registry import methods
from tests.conftest import make_input, make_model, run

# Methods whose contract test needs a non-default config to attach to the tiny models
# declare ``contract_config(model_kind) -> DeltaConfig | None`` on their class (None = skip).


def _config(spec, kind):
    hook = getattr(spec.cls, "contract_config", None)
    if hook is not None:
        return hook(kind)
    if kind == "conv":
        return spec.config(targets=["conv1", "conv2"]) if spec.conv else None
    return spec.config()


CASES = [(name, kind) for name, spec in sorted(methods().items())
         for kind in ("bert", "gpt2", "llama", "conv")]


def _perturb(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.is_floating_point():
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p))


def _setup(name, kind):
    spec = methods()[name]
    cfg = _config(spec, kind)
    if cfg is None:
        pytest.skip(f"{name} does not apply to {kind}")
    model = make_model(kind)
    x = make_input(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    y_base = run(model, x).detach()
    adapter = dk.attach(model, cfg, name="a")
    _perturb(adapter)
    return spec, cfg, model, x, base_state, y_base, adapter


@pytest.mark.parametrize("name,kind", CASES)
def test_contract(name, kind, tmp_path):
    spec, cfg, model, x, base_state, y_base, adapter = _setup(name, kind)
    y = run(model, x).detach()
    assert not torch.allclose(y, y_base), "a perturbed adapter must change the output"

    # disabled == base
    with dk.disabled(model):
        torch.testing.assert_close(run(model, x), y_base, rtol=0, atol=1e-6)

    # only adapter parameters receive gradients
    model.train()
    torch.manual_seed(0)
    run(model, x).float().pow(2).mean().backward()
    own = {id(p) for p in adapter.parameters()}
    for n, p in model.named_parameters():
        if id(p) not in own:
            assert p.grad is None, f"base parameter {n} received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()

    # merged == unmerged; unmerge restores the base; the task vector is the dense dW
    if spec.kind == "weight":
        from deltakit.taskvec import as_dense
        tv = dk.TaskVector.from_adapter(adapter)
        dense = dict(adapter.delta_weights())
        assert set(tv.keys()) == set(dense)
        for key, dw in dense.items():
            torch.testing.assert_close(as_dense(tv.get(key)).to(dw), dw, rtol=1e-4, atol=1e-5)
        adapter.merge()
        torch.testing.assert_close(run(model, x).detach(), y, rtol=1e-4, atol=1e-4)
        adapter.unmerge()
        torch.testing.assert_close(run(model, x).detach(), y, rtol=0, atol=1e-6)
    else:
        with pytest.raises(dk.DeltaStateError):
            adapter.merge()

    # mixed batch == per-row
    other = dk.attach(model, cfg, name="b")
    _perturb(other, seed=1)
    dk.set_active(model, "b")
    y_b = run(model, x).detach()
    rows = (["a", "b", None] * x.shape[0])[: x.shape[0]]
    with dk.mixed_batch(model, rows):
        y_mix = run(model, x).detach()
    for i, r in enumerate(rows):
        ref = {"a": y, "b": y_b, None: y_base}[r]
        torch.testing.assert_close(y_mix[i], ref[i], rtol=1e-5, atol=1e-5)
    dk.detach(model, "b")
    dk.set_active(model, "a")

    # save / load round-trips exactly
    dk.save_adapter(adapter, tmp_path / "ad")
    fresh = make_model(kind)
    loaded = dk.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(run(fresh, x).detach(), y, rtol=0, atol=0)
    assert loaded.num_parameters() == adapter.num_parameters()

    # detach restores the original module tree and weights
    dk.detach(model, "a")
    assert set(model.state_dict()) == set(base_state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name,kind", [(n, k) for n, k in CASES if k in ("bert", "llama")])
def test_trains_under_bf16_autocast(name, kind):
    """Mixed-precision training (torch.autocast, fp32 master weights) works for every method:
    autocast makes matmuls return bf16, which breaks methods that mix the result with fp32."""
    spec, cfg, model, x, base_state, y_base, adapter = _setup(name, kind)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run(model, x).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in adapter.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in adapter.parameters() if p.is_floating_point())
