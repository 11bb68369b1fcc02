"""LoraHub: the paper's element-wise composition of LoRA factors, and the CMA-ES fit of its weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltakit as dk
from deltakit.route import RoutingError, get_router
from deltakit.route.lorahub import LoraHub, compose, compose_factors
from tests.library._helpers import mlp


def _lora(model, name: str, seed: int, r: int = 2, alpha: float = 2.0, targets=("0", "2")):
    """A LoRA with seeded random factors (scale alpha / r = 1), attached inactive."""
    ad = dk.attach(model, dk.LoraConfig(r=r, alpha=alpha, targets=list(targets)), name=name, activate=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(ad.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return ad


def _model_with(k: int = 3):
    model = mlp()
    names = [f"t{i}" for i in range(k)]
    for i, n in enumerate(names):
        _lora(model, n, seed=10 + i)
    return model, names


def _only(model, names):
    dk.set_active(model, names)
    return model


def test_compose_factors_hand_checked():
    # A_1 = [1 2], A_2 = [3 -1]; B_1 = [2 4]^T, B_2 = [1 1]^T; w = (0.5, -1)
    f1 = {"l": (torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0], [4.0]]))}
    f2 = {"l": (torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0], [1.0]]))}
    A, B = compose_factors([f1, f2], (0.5, -1.0))["l"]
    # A = 0.5 [1 2] - [3 -1] = [-2.5 2];  B = 0.5 [2 4]^T - [1 1]^T = [0 1]^T
    assert torch.equal(A, torch.tensor([[-2.5, 2.0]])) and torch.equal(B, torch.tensor([[0.0], [1.0]]))
    # dW = B A = [[0 0], [-2.5 2]]: the cross terms w_i w_j B_i A_j, not sum w_i B_i A_i
    assert torch.equal(B @ A, torch.tensor([[0.0, 0.0], [-2.5, 2.0]]))
    with pytest.raises(RoutingError, match="expected 2 weights"):
        compose_factors([f1, f2], (1.0,))


def test_compose_on_a_model_gives_the_factor_sums_and_one_hot_gives_that_adapter():
    model, names = _model_with(2)
    ad = compose(model, names, (0.5, -1.0), name="hub")
    for path in ("0", "2"):
        d, d0, d1 = (model.get_submodule(path).deltas[n] for n in ("hub", "t0", "t1"))
        assert torch.allclose(d.lora_A, 0.5 * d0.lora_A - d1.lora_A) and torch.allclose(d.lora_B, 0.5 * d0.lora_B - d1.lora_B)
    assert ad.name == "hub" and "hub" not in dk.active(model)
    dk.detach(model, "hub")
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    compose(model, names, (0.0, 1.0), name="hot")
    hot = _only(model, ["hot"])(x)
    assert torch.equal(hot, _only(model, ["t1"])(x))


def test_compose_refuses_unequal_ranks_targets_and_methods():
    model, names = _model_with(2)
    _lora(model, "r4", seed=3, r=4, alpha=4.0)
    _lora(model, "other", seed=4, targets=("0",))
    with pytest.raises(RoutingError, match=r"^lorahub compose: expected one rank and scale.*r=2.*r=4"):
        compose(model, ["t0", "r4"], (1.0, 1.0))
    with pytest.raises(RoutingError, match="expected the same targets"):
        compose(model, ["t0", "other"], (1.0, 1.0))
    from deltakit.methods.ia3 import IA3Config
    dk.attach(model, IA3Config(targets=["0"], feedforward=[]), name="ia3", activate=False)
    with pytest.raises(RoutingError, match=r"expected LoRA adapters, found 'ia3' \(ia3\)"):
        compose(model, ["t0", "ia3"], (1.0, 1.0))
    assert "lorahub" not in dk.adapters(model)


def _task(model, name: str, n: int = 32):
    """Few-shot batches whose targets are the model's outputs with adapter ``name`` alone."""
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = _only(model, [name])(x)
    dk.set_active(model, [])
    return [{"x": x[:n // 2], "y": y[:n // 2]}, {"x": x[n // 2:], "y": y[n // 2:]}]


def _mse(m, b):
    return F.mse_loss(m(b["x"]), b["y"])


@pytest.mark.parametrize("mode", ["compose", "mix"])
def test_fit_puts_the_weight_on_the_right_adapter(mode):
    model, names = _model_with(3)
    batches = _task(model, "t1")
    model.train()
    hub = LoraHub.fit(model, names, batches, loss_fn=_mse, iterations=60, seed=0, mode=mode, progress=False)
    w = hub.weights.abs()
    assert get_router("lorahub") is LoraHub and hub.weights.shape == (3,) and len(hub.history) == 60
    assert int(w.argmax()) == 1 and w[1] > 0.7 and w[0] < 0.3 and w[2] < 0.3, hub.weights
    assert hub.history[0] > 3 * hub.best and hub.best == min(hub.history)  # the start w = 0 is the base
    assert dk.active(model) == [] and model.training  # the fit ran in eval mode and switched nothing on for good
    x = batches[0]["x"]
    with hub.scope(model, batches[0]):
        routed = model(x)
    if mode == "compose":
        assert "lorahub" in dk.adapters(model)
        assert torch.allclose(routed, _only(model, ["lorahub"])(x), atol=1e-6)
    else:  # base(x) + sum_i w_i delta_i(x): with one target layer per branch, linear in the deltas
        assert "lorahub" not in dk.adapters(model)
    assert hub.decisions[0].top == "t1" and len(hub.decisions) == 16


def test_mix_scope_is_the_weighted_sum_of_the_deltas():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    names = ["a", "b"]
    for i, n in enumerate(names):
        _lora(model, n, seed=i, targets=("0",))
    hub = LoraHub(names=tuple(names), weights=torch.tensor([0.5, -1.0]), mode="mix")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    W, b = model[0].base.weight, model[0].base.bias
    dw = {n: dk.get_adapter(model, n).model[0].weight_delta([n])["weight"] for n in names}
    with hub.scope(model, {"x": x}):
        got = model(x)
    want = x @ (W + 0.5 * dw["a"] - dw["b"]).T + b
    assert torch.allclose(got, want, atol=1e-5)


def test_fit_is_deterministic_for_a_seed():
    runs = []
    for seed in (3, 3, 4):
        model, names = _model_with(3)
        runs.append(LoraHub.fit(model, names, _task(model, "t2"), loss_fn=_mse, iterations=15, seed=seed,
                                progress=False))
    assert torch.equal(runs[0].weights, runs[1].weights) and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_fit_errors_are_one_line():
    model, names = _model_with(2)
    with pytest.raises(RoutingError, match=r"^lorahub: expected attached adapters, found unknown \['nope'\]"):
        LoraHub.fit(model, ["t0", "nope"], _task(model, "t0"), loss_fn=_mse, progress=False)
    with pytest.raises(RoutingError, match="^lorahub: expected at least one few-shot batch"):
        LoraHub.fit(model, names, [], loss_fn=_mse, progress=False)

    def boom(m, b):
        raise RuntimeError("loss failed")
    with pytest.raises(RuntimeError, match="loss failed"):
        LoraHub.fit(model, names, _task(model, "t0"), loss_fn=boom, progress=False)
    assert "lorahub" not in dk.adapters(model)  # a failed fit leaves no composed adapter


def test_composed_adapter_goes_into_a_library_with_lorahub_lineage(tmp_path):
    from deltakit.library import AdapterLibrary
    from tests.library._helpers import lora_dir

    base = mlp()
    lib = AdapterLibrary(tmp_path / "lib")
    for i in range(2):
        lib.add(lora_dir(tmp_path / f"t{i}", base, r=2, targets=["0", "2"], seed=20 + i), model=base, name=f"t{i}")
        lib.load(base, f"t{i}", name=f"t{i}")
    dk.set_active(base, [])
    hub = LoraHub.fit(base, ["t0", "t1"], _task(base, "t0"), loss_fn=_mse, iterations=8, progress=False)
    e = hub.add_to_library(lib, base, ["t0@1", "t1@1"], name="new-task", task="new")
    parents = {lib.get(r).id for r in ("t0@1", "t1@1")}
    assert e.ref == "new-task@1" and "lorahub" in e.tags and {p for p, _ in e.lineage} == parents
    assert {h for _, h in e.lineage} == {"lorahub"}
    loaded = lib.load(mlp(), "new-task", name="x")
    for path in ("0", "2"):
        assert torch.equal(loaded.model.get_submodule(path).deltas["x"].lora_A,
                           base.get_submodule(path).deltas["lorahub"].lora_A)


def test_fit_on_a_causal_lm_with_its_own_loss_starts_at_the_base_and_reports_progress(capsys):
    from tests.conftest import make_input, make_model

    model = make_model("llama")
    names = ["p", "q"]
    for i, n in enumerate(names):
        _lora(model, n, seed=30 + i, targets=("q_proj", "v_proj"))
    ids = make_input("llama", batch=4)
    batches = [{"input_ids": ids, "labels": ids}]  # the model's own .loss (no loss_fn)
    with torch.no_grad(), dk.disabled(model):
        base_loss = float(model(**batches[0]).loss)
    hub = LoraHub.fit(model, names, batches, iterations=12, seed=1, progress=True)
    # w = 0 composes a zero LoRA: the base's loss, and an L1 term of 0
    assert hub.history[0] == pytest.approx(base_loss, abs=1e-6)
    w = hub.weights
    assert hub.describe() == (f"lorahub (compose): p={float(w[0]):.3f}, q={float(w[1]):.3f}; "
                              f"best objective {hub.best:.4f} after 12 evaluations")
    dk.set_active(model, ["lorahub"])
    with torch.no_grad():
        loss = float(model(**batches[0]).loss)
    assert hub.best == pytest.approx(loss + 0.05 * float(w.abs().sum()), abs=1e-5)
    err = capsys.readouterr().err.splitlines()  # not a terminal: a line every 10 evaluations and at the end
    assert [ln.split(", best")[0] for ln in err] == ["lorahub: 10/12 evaluations", "lorahub: 12/12 evaluations"]
    assert err[-1].endswith(f"best objective {hub.best:.4f}")
