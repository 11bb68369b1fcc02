"""The contract of tests/core/test_contract.py for methods that need data before they compute.

Such methods (CorDA, LT-SFT, SPT) opt out of the automatic matrix (``contract_config`` is
None: attaching alone gives no usable adapter); their own test files run these same checks
after ``prepare(adapter, model, x)`` has given the adapter its data.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import deltakit as dk
from tests.conftest import make_input, make_model, run
from tests.core.test_contract import _perturb


def check_contract(kind: str, cfg, prepare: Callable, tmp_path) -> None:
    model, x = make_model(kind), make_input(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    y_base = run(model, x).detach()
    adapter = dk.attach(model, cfg, name="a")
    prepare(adapter, model, x)
    _perturb(adapter)
    y = run(model, x).detach()
    assert not torch.allclose(y, y_base)
    with dk.disabled(model):
        torch.testing.assert_close(run(model, x), y_base, rtol=0, atol=1e-6)
    _check_gradients(model, adapter, x)
    _check_merge(model, adapter, x, y)
    other = dk.attach(model, cfg, name="b")
    prepare(other, model, x)
    _perturb(other, seed=1)
    dk.set_active(model, "b")
    y_b = run(model, x).detach()
    rows = (["a", "b", None] * x.shape[0])[: x.shape[0]]
    with dk.mixed_batch(model, rows):
        y_mix = run(model, x).detach()
    for i, r in enumerate(rows):
        torch.testing.assert_close(y_mix[i], {"a": y, "b": y_b, None: y_base}[r][i], rtol=1e-5, atol=1e-5)
    dk.detach(model, "b")
    dk.set_active(model, "a")
    dk.save_adapter(adapter, tmp_path / "ad")
    fresh = make_model(kind)
    loaded = dk.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(run(fresh, x).detach(), y, rtol=0, atol=0)
    assert loaded.num_parameters() == adapter.num_parameters()
    dk.detach(model, "a")
    assert set(model.state_dict()) == set(base_state)
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


def _check_gradients(model, adapter, x) -> None:
    model.train()
    run(model, x).float().pow(2).mean().backward()
    own = {id(p) for p in adapter.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in own)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def _check_merge(model, adapter, x, y) -> None:
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
