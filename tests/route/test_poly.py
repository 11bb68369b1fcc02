"""Poly / MHR: hand-worked weights (sigmoid normalisation, the relaxed-Bernoulli draw), the routed
forward against dense sums, MHR(h=1) == Poly, learning the right skill per task with ``fit``,
what trains, save / load, and parity with peft's PolyRouter."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import deltakit as dk
from deltakit.route import RoutingError, get_router
from deltakit.route.poly import MHR, Poly, PolyModel, poly_weights


def _mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, out))


def _skills(model: nn.Module, names=("a", "b"), r: int = 2, targets=("0", "2")) -> None:
    """Attach LoRAs with non-zero B (a fresh LoRA's B is zero: its delta would be nothing)."""
    for k in names:
        ad = dk.attach(model, dk.LoraConfig(r=r, alpha=2.0 * r, targets=list(targets)), name=k)
        for _, d in ad.deltas():
            nn.init.normal_(d.lora_B, std=1.0)


def _delta(model: nn.Module, path: str, name: str) -> torch.Tensor:
    return dict(dk.get_adapter(model, name).deltas())[path].product()


# ---------------------------------------------------------------- the weights, by hand
def test_sigmoid_weights_normalise_to_one_by_hand():
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4 -> 0.5 / 1.25 = 0.4, 0.75 / 1.25 = 0.6
    z = torch.tensor([[0.0, math.log(3.0)]]).unsqueeze(-1)  # (1, S=2, h=1)
    w = poly_weights(z, sample=False)
    assert torch.allclose(w.squeeze(-1), torch.tensor([[0.4, 0.6]]), atol=1e-7)
    # MHR: normalised over skills per head, independently: head 1 has sigmoid(-ln 3) = 1/4 and 3/4
    z2 = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # (S=2, h=2)
    w2 = poly_weights(z2, sample=False)
    assert torch.allclose(w2, torch.tensor([[0.4, 2 / 3], [0.6, 1 / 3]]), atol=1e-7)


def test_relaxed_bernoulli_draw_by_hand():
    # seed 0 draws u = 0.4963, 0.7682 (torch's CPU generator). At logits 0 and tau = 1 the
    # relaxed Bernoulli sample is sigmoid(logit(u)) = u itself, so the weights are u / sum(u).
    z = torch.zeros(2, 1)
    w = poly_weights(z, sample=True, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.49625659, 0.76822180])
    assert torch.allclose(w[:, 0], u / u.sum(), atol=1e-6)
    assert torch.allclose(w[:, 0], torch.tensor([0.392456, 0.607544]), atol=1e-6)
    # tau = 1/2 squares the odds: p = u^2 / (u^2 + (1-u)^2)
    w = poly_weights(z, sample=True, temperature=0.5, generator=torch.Generator().manual_seed(0))
    p = u ** 2 / (u ** 2 + (1 - u) ** 2)
    assert torch.allclose(w[:, 0], p / p.sum(), atol=1e-6)
    # logits shift the log-odds: logits (ln 2, 0), tau 1 -> p0 = 2u0 / (2u0 + 1 - u0)
    w = poly_weights(torch.tensor([[math.log(2.0)], [0.0]]), sample=True,
                     generator=torch.Generator().manual_seed(0))
    p = torch.stack([2 * u[0] / (2 * u[0] + 1 - u[0]), u[1]])
    assert torch.allclose(w[:, 0], p / p.sum(), atol=1e-6)


def test_draw_equals_torch_relaxed_bernoulli_from_the_same_rng_state():
    z = torch.randn(5, 4, 1)
    torch.manual_seed(3)
    ref = torch.distributions.RelaxedBernoulli(torch.tensor(0.7), logits=z).rsample()
    torch.manual_seed(3)
    w = poly_weights(z, sample=True, temperature=0.7)
    assert torch.allclose(w, ref / (ref.sum(-2, keepdim=True) + 1e-12), atol=1e-6)


def test_router_weights_follow_training_mode_and_task_names():
    model = _mlp()
    _skills(model)
    router = Poly.for_model(model, ("a", "b"), tasks=("x", "y"))
    assert router.layers == ("0", "2") and router.routing.logits.shape == (2, 2, 2, 1)
    with torch.no_grad():
        router.routing.logits.copy_(torch.tensor([0.0, math.log(3.0)]).view(1, 1, 2, 1).expand(2, 2, 2, 1))
    assert not router.routing.training  # a new router routes deterministically
    w = router.weights(["y", "x", 1])
    assert torch.allclose(w[..., 0], torch.tensor([0.4, 0.6]).expand(2, 3, 2), atol=1e-7)
    router.routing.train()
    torch.manual_seed(0)
    drawn = router.weights(torch.tensor([0]))
    assert not torch.allclose(drawn[..., 0], torch.tensor([0.4, 0.6]), atol=1e-3)
    assert torch.allclose(drawn.sum(-2), torch.ones(2, 1, 1), atol=1e-6)


# ---------------------------------------------------------------- the routed forward
def test_scope_gives_base_plus_weighted_deltas_per_layer_and_row():
    model = _mlp()
    _skills(model)
    router = Poly.for_model(model, ("a", "b"), n_tasks=2)
    z = torch.tensor([[[1.0, -1.0], [0.0, 2.0]],    # layer "0": task 0, task 1
                      [[-0.5, 0.5], [3.0, 0.0]]])   # layer "2"
    with torch.no_grad():
        router.routing.logits.copy_(z.unsqueeze(-1))
    w = torch.sigmoid(z) / torch.sigmoid(z).sum(-1, keepdim=True)  # (L, T, S)
    x, tasks = torch.randn(3, 6), torch.tensor([1, 0, 1])
    with router.scope(model, {"task_ids": tasks}):
        got = model(x)
    lin0, lin2 = model[0].base, model[2].base
    want = []
    for i, t in enumerate(tasks.tolist()):
        w0 = lin0.weight + w[0, t, 0] * _delta(model, "0", "a") + w[0, t, 1] * _delta(model, "0", "b")
        w2 = lin2.weight + w[1, t, 0] * _delta(model, "2", "a") + w[1, t, 1] * _delta(model, "2", "b")
        h = torch.tanh(x[i] @ w0.T + lin0.bias)
        want.append(h @ w2.T + lin2.bias)
    assert torch.allclose(got, torch.stack(want), atol=1e-5)
    # the recorded decision: per row, each skill's weight averaged over the two layers
    d = router.decisions[0].weights
    assert d["a"] == pytest.approx(round(float(w[:, 1, 0].mean()), 4))
    assert router.decisions[1].top == ("a" if w[:, 0, 0].mean() > 0.5 else "b")


def test_shared_routing_is_one_logit_matrix_for_every_layer():
    model = _mlp()
    _skills(model)
    router = Poly.for_model(model, ("a", "b"), n_tasks=2, per_layer=False)
    assert router.layers == () and router.routing.logits.shape == (1, 2, 2, 1)
    with torch.no_grad():
        router.routing.logits.copy_(torch.tensor([[[[20.0], [-20.0]], [[-20.0], [20.0]]]]))
    x = torch.randn(4, 6)
    with router.scope(model, {"task_ids": torch.tensor([0, 1, 1, 0])}):
        got = model(x)
    with dk.mixed_batch(model, ["a", "b", "b", "a"]):
        one_hot = model(x)
    assert torch.allclose(got, one_hot, atol=1e-6)


def test_mhr_heads_weight_rank_blocks_by_hand():
    model = nn.Sequential(nn.Linear(6, 6))
    _skills(model, targets=("0",), r=4)
    router = MHR.for_model(model, ("a", "b"), n_tasks=1, heads=2)
    z = torch.tensor([[2.0, -1.0], [0.0, 1.0]])  # (S, h)
    with torch.no_grad():
        router.routing.logits.copy_(z.view(1, 1, 2, 2))
    w = torch.sigmoid(z) / torch.sigmoid(z).sum(0, keepdim=True)
    x = torch.randn(2, 6)
    with router.scope(model, {"task_ids": torch.tensor([0, 0])}):
        got = model(x)
    dw = torch.zeros(6, 6)
    for s, n in enumerate(("a", "b")):
        d = dict(dk.get_adapter(model, n).deltas())["0"]
        for j in range(2):  # head j: rank rows 2j, 2j+1 of A, the matching columns of B
            dw += w[s, j] * d.scale * d.lora_B[:, 2 * j:2 * j + 2] @ d.lora_A[2 * j:2 * j + 2]
    want = x @ (model[0].base.weight + dw).T + model[0].base.bias
    assert torch.allclose(got, want, atol=1e-5)


def test_mhr_with_one_head_is_poly():
    model = _mlp()
    _skills(model)
    poly = Poly.for_model(model, ("a", "b"), n_tasks=3, seed=5)
    mhr = MHR.for_model(model, ("a", "b"), n_tasks=3, seed=5, heads=1)
    assert torch.equal(poly.routing.logits, mhr.routing.logits)
    x, tasks = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    for train in (False, True):
        outs = []
        for router in (poly, mhr):
            router.routing.train(train)
            torch.manual_seed(11)
            with router.scope(model, {"task_ids": tasks}):
                outs.append(model(x))
        assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- learning, and what learns
def _two_task_data(model: nn.Module, n: int = 32) -> dict[str, list[dict]]:
    """Task "ta" is exactly skill a's function, task "tb" skill b's."""
    g = torch.Generator().manual_seed(1)
    data = {}
    for task, skill in (("ta", "a"), ("tb", "b")):
        x = torch.randn(n, 6, generator=g)
        with dk.mixed_batch(model, [skill] * n), torch.no_grad():
            y = model(x)
        data[task] = [{"x": x[i], "y": y[i]} for i in range(n)]
    return data


@torch.no_grad()
def _eval_loss(model: nn.Module, router: Poly, data) -> float:
    rows = [(r, t) for t in data for r in data[t]]
    batch = {"x": torch.stack([r["x"] for r, _ in rows]), "y": torch.stack([r["y"] for r, _ in rows]),
             "task_ids": [t for _, t in rows]}
    return float(_mse(PolyModel(model, router), batch))


def _mse(m: PolyModel, b) -> torch.Tensor:
    return nn.functional.mse_loss(m(b["x"], task_ids=b["task_ids"]), b["y"])


@pytest.mark.parametrize("cls,options", [(Poly, {}), (MHR, {"heads": 2})])
def test_learns_the_right_skill_per_task(cls, options):
    model = _mlp()
    _skills(model)
    data = _two_task_data(model)
    router = cls.fit_routing(model, ("a", "b"), data, steps=60, lr=0.1, loss_fn=_mse, seed=0, **options)
    assert router.tasks == ("ta", "tb") and not router.routing.training
    w = router.weights(["ta", "tb"]).detach()  # (L, B, S, h): every layer and head picks the task's own skill
    assert (w[:, 0, 0] > 0.6).all() and (w[:, 1, 1] > 0.6).all(), w
    assert w[:, 0, 0].mean() > 0.75 and w[:, 1, 1].mean() > 0.75, w
    tw = router.task_weights()  # averaged over layers and heads, largest first
    assert list(tw) == ["ta", "tb"] and list(tw["ta"]) == ["a", "b"] and list(tw["tb"]) == ["b", "a"]
    assert tw["ta"]["a"] == pytest.approx(float(w[:, 0, 0].mean()), abs=1e-4)
    # the eval-mode loss against the untrained router (weights ~1/2 each)
    untrained = cls.for_model(model, ("a", "b"), tasks=("ta", "tb"), **options)
    assert _eval_loss(model, router, data) < 0.2 * _eval_loss(model, untrained, data)
    # routed by the learned weights, each task's rows are nearer its own skill than the other's
    x = torch.stack([r["x"] for r in data["ta"][:8]])
    with router.scope(model, {"task_ids": ["ta"] * 8}):
        routed_out = model(x)
    own = torch.stack([r["y"] for r in data["ta"][:8]])
    with dk.mixed_batch(model, ["b"] * 8):
        other = model(x)
    assert (routed_out - own).pow(2).mean() < 0.5 * (routed_out - other).pow(2).mean()


def test_gradients_reach_only_the_logits_unless_skills_train():
    model = _mlp()
    _skills(model)
    data = _two_task_data(model, n=8)
    router = Poly.for_model(model, ("a", "b"), tasks=("ta", "tb"))
    skills = {k: p.detach().clone() for n in ("a", "b") for k, p in dk.get_adapter(model, n).named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    logits0 = router.routing.logits.detach().clone()
    router.train_routing(model, data, steps=3, lr=0.1, loss_fn=_mse)
    assert not torch.equal(router.routing.logits, logits0)
    after = {k: p for n in ("a", "b") for k, p in dk.get_adapter(model, n).named_parameters()}
    assert all(torch.equal(after[k], v) for k, v in skills.items())
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in base.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    # one backward through PolyModel: only the logits (and, if asked, the skills) get a gradient
    pm = PolyModel(model, router)
    for train_skills in (False, True):
        with _requires_grad_only(pm, router.trainable(model, train_skills).values()):
            _mse(pm, {"x": torch.randn(4, 6), "y": torch.randn(4, 3), "task_ids": torch.tensor([0, 1, 0, 1])}).backward()
            got = {n for n, p in pm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            pm.zero_grad(set_to_none=True)
        want = {"routing.logits"} | ({n for n, _ in pm.named_parameters() if ".deltas." in n} if train_skills else set())
        assert got == want
    router.train_routing(model, data, steps=3, lr=0.05, loss_fn=_mse, train_skills=True)
    after = {k: p for n in ("a", "b") for k, p in dk.get_adapter(model, n).named_parameters()}
    assert any(not torch.equal(after[k], v) for k, v in skills.items())
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in base.items())


def _requires_grad_only(module: nn.Module, params):
    from deltakit.route.poly import _only_these_train
    return _only_these_train(module, list(params))


def test_fresh_skills_train_jointly_with_the_routing():
    model = _mlp()
    names = Poly.fresh_skills(model, 3, dk.LoraConfig(r=2, targets=["0", "2"]))
    assert names == ("skill0", "skill1", "skill2") and dk.active(model) == []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g)
    data = {"t0": [{"x": x[i], "y": torch.tensor([1.0, 0.0, 0.0])} for i in range(16)]}
    router = Poly.fit_routing(model, names, data, steps=30, lr=0.02, loss_fn=_mse, train_skills=True)
    hist = router.fit_result.history
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]


# ---------------------------------------------------------------- files and errors
def test_save_load_round_trip_and_refusals(tmp_path):
    model = _mlp()
    _skills(model)
    router = MHR.for_model(model, ("a", "b"), tasks=("x", "y", "z"), heads=2, temperature=0.5)
    with torch.no_grad():
        router.routing.logits.normal_()
    path = tmp_path / "routing.safetensors"
    router.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.safetensors"]  # no temp file left
    back = Poly.from_file(path)
    assert type(back) is MHR and back.heads == 2 and back.tasks == ("x", "y", "z")
    assert back.layers == ("0", "2") and back.temperature == 0.5
    assert torch.equal(back.routing.logits, router.routing.logits)
    assert get_router("mhr") is MHR
    poly = Poly.for_model(model, ("a", "b"), n_tasks=1, per_layer=False, mixing="parameter", seed=3)
    poly.save(tmp_path / "poly.safetensors")
    back = Poly.from_file(tmp_path / "poly.safetensors")
    assert type(back) is Poly and back.layers == () and back.mixing == "parameter"
    assert torch.equal(back.routing.logits, poly.routing.logits)
    with pytest.raises(RoutingError, match=r"holds a 'poly' router, expected 'mhr'"):
        MHR.from_file(tmp_path / "poly.safetensors")
    other = MHR.for_model(model, ("a", "b"), tasks=("x", "y"), heads=2)
    with pytest.raises(RoutingError, match=r"routing saved for tasks=\['x', 'y', 'z'\], this router has tasks=\['x', 'y'\]"):
        other.load_routing(path)
    other = MHR.for_model(model, ("a", "b"), tasks=("x", "y", "z"), heads=1)
    with pytest.raises(RoutingError, match=r"routing saved for heads=2, this router has heads=1"):
        other.load_routing(path)
    from deltakit.io.tensors import read_header, save_tensors
    _, meta = read_header(path)
    save_tensors(path, {"logits": torch.zeros(2, 3, 2, 4)}, metadata=meta)
    with pytest.raises(RoutingError, match=r"logits of shape \(2, 3, 2, 4\), expected \(2, 3, 2, 2\)"):
        router.load_routing(path)
    save_tensors(path, {"w": torch.zeros(2)}, metadata={"format": "other"})
    with pytest.raises(RoutingError, match="not a Poly/MHR routing file"):
        router.load_routing(path)


def test_one_line_errors():
    model = _mlp()
    _skills(model)
    router = Poly.for_model(model, ("a", "b"), tasks=("x", "y"))
    with pytest.raises(RoutingError, match=r"task ids must be in \[0, 2\); found \[2\]"):
        router.weights(torch.tensor([0, 2]))
    with pytest.raises(RoutingError, match=r"expected task ids as ints or names in \['x', 'y'\], found 'w'"):
        router.weights(["w"])
    with pytest.raises(RoutingError, match=r"the batch needs 'task_ids'"):
        router.weights_for(model, {"x": 1})
    with pytest.raises(RoutingError, match=r"skills \['c'\] are not attached"):
        Poly.for_model(model, ("a", "c"), n_tasks=1)
    with pytest.raises(RoutingError, match="expected n_tasks >= 1"):
        Poly(("a",))
    with pytest.raises(RoutingError, match="mhr: expected heads >= 1"):
        MHR(("a",), n_tasks=1, heads=0)
    with pytest.raises(RoutingError, match=r"examples for unknown tasks \['q'\]"):
        router.train_routing(model, {"q": []}, steps=1)
    mhr = MHR.for_model(model, ("a", "b"), n_tasks=1, heads=4)  # rank 2 is not divisible by 4
    with pytest.raises(ValueError, match="needs ranks divisible by it"), mhr.scope(model, {"task_ids": [0]}):
        model(torch.randn(1, 6))


# ---------------------------------------------------------------- parameter mixing, and peft
def _peft_twin(model: nn.Module, heads: int, n_tasks: int = 3):
    """peft's Poly on a copy of ``model``'s base, with our skills' factors and our logits."""
    import copy

    from peft import PolyConfig, get_peft_model
    base = copy.deepcopy(nn.Sequential(model[0].base, model[1], model[2].base))
    twin = get_peft_model(base, PolyConfig(r=2, target_modules=["0", "2"], n_tasks=n_tasks, n_skills=2,
                                           n_splits=heads))
    return twin


def _copy_into_peft(twin, model: nn.Module, router: Poly, heads: int) -> None:
    """Our A_s (r, in), B_s (out, r) and logits (L, T, S, h) in peft's layout: A (h, S, in/h, r),
    B (h, S, r, out/h), module_logits (T, h*S) viewed (T, h, S)."""
    with torch.no_grad():
        for li, path in enumerate(("0", "2")):
            layer = twin.base_model.model.get_submodule(path)
            for s, n in enumerate(("a", "b")):
                d = dict(dk.get_adapter(model, n).deltas())[path]
                r, d_in = d.lora_A.shape
                d_out = d.lora_B.shape[0]
                for q in range(heads):
                    layer.poly_lora_A["default"][q, s] = d.lora_A.view(r, heads, d_in // heads)[:, q].T
                    layer.poly_lora_B["default"][q, s] = d.lora_B.view(heads, d_out // heads, r)[q].T
            z = router.routing.logits[li]  # (T, S, h)
            layer.poly_router["default"].module_logits.copy_(z.permute(0, 2, 1).reshape(z.shape[0], -1))


@pytest.mark.parametrize("heads", [1, 2])
def test_parameter_mixing_equals_peft_poly(heads):
    model = _mlp(out=4)  # peft floors out / n_splits: sizes divisible by the heads
    for k in ("a", "b"):  # alpha 1: scale 1/r, peft's Poly scale
        ad = dk.attach(model, dk.LoraConfig(r=2, alpha=1.0, targets=["0", "2"]), name=k)
        for _, d in ad.deltas():
            nn.init.normal_(d.lora_B, std=1.0)
    cls, options = (Poly, {}) if heads == 1 else (MHR, {"heads": heads})
    router = cls.for_model(model, ("a", "b"), n_tasks=3, mixing="parameter", **options)
    with torch.no_grad():
        router.routing.logits.normal_(0.0, 2.0)
    twin = _peft_twin(model, heads)
    _copy_into_peft(twin, model, router, heads)
    twin.eval()
    x, tasks = torch.randn(4, 5, 6), torch.tensor([2, 0, 1, 2])
    with router.scope(model, {"task_ids": tasks}):
        ours = model(x)
    theirs = twin.base_model(x, task_ids=tasks)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # output mixing is a different function for a mixture (no cross terms B_i A_j) ...
    router.mixing = "output"
    if heads == 1:
        with router.scope(model, {"task_ids": tasks}):
            assert not torch.allclose(model(x), theirs, atol=1e-3)


def test_parameter_mixing_by_hand_and_one_hot_equals_output_mixing():
    model = nn.Sequential(nn.Linear(6, 6))
    _skills(model, targets=("0",))
    router = Poly.for_model(model, ("a", "b"), n_tasks=2, mixing="parameter")
    with torch.no_grad():
        router.routing.logits.copy_(torch.tensor([[[[0.0], [0.0]], [[30.0], [-30.0]]]]))
    da, db = (dict(dk.get_adapter(model, n).deltas())["0"] for n in ("a", "b"))
    x = torch.randn(2, 6)
    with router.scope(model, {"task_ids": torch.tensor([0, 1])}):
        got = model(x)
    # task 0: weights 1/2 each -> (B_a s + B_b s)/2 @ (A_a + A_b)/2, cross terms included
    dw0 = ((da.lora_B * da.scale + db.lora_B * db.scale) / 2) @ ((da.lora_A + db.lora_A) / 2)
    base = model[0].base
    assert torch.allclose(got[0], x[0] @ (base.weight + dw0).T + base.bias, atol=1e-5)
    # task 1: one-hot on a (sigmoid(30)/(sigmoid(30)+sigmoid(-30)) = 1 - 9e-14): exactly skill a
    with dk.mixed_batch(model, ["a", "a"]):
        alone = model(x)
    assert torch.allclose(got[1], alone[1], atol=1e-6)
    assert dk.active(model) == ["b"]  # the scope changed no state


def test_parameter_mixing_gradients_and_refusals():
    model = _mlp()
    _skills(model)
    data = _two_task_data(model)
    router = Poly.fit_routing(model, ("a", "b"), data, steps=60, lr=0.1, loss_fn=_mse, mixing="parameter")
    w = router.weights(["ta", "tb"])
    assert w[:, 0, 0].mean() > 0.75 and w[:, 1, 1].mean() > 0.75, w
    mixed = _mlp()
    dk.attach(mixed, dk.LoraConfig(r=2, targets=["0", "2"]), name="a")
    dk.attach(mixed, dk.LoraConfig(r=4, targets=["0", "2"]), name="b")
    bad = Poly.for_model(mixed, ("a", "b"), n_tasks=1, mixing="parameter")
    with pytest.raises(RoutingError, match=r"layer '0': parameter mixing needs skills of one rank, found ranks \[2, 4\]"):
        bad.scope(mixed, {"task_ids": [0]}).__enter__()
    dora = _mlp()
    dk.attach(dora, dk.get_method("dora").config(r=2, targets=["0"]), name="a")
    with pytest.raises(RoutingError, match=r"needs LoRA skills on Linear / Conv1D layers, found \['DoRA'\]"):
        Poly.for_model(dora, ("a",), n_tasks=1, mixing="parameter").scope(dora, {"task_ids": [0]}).__enter__()
    with pytest.raises(RoutingError, match=r"expected mixing in \['output', 'parameter'\], found 'both'"):
        Poly(("a",), n_tasks=1, mixing="both")


def test_parameter_mixing_hook_is_installed_once_and_inert_outside():
    import copy
    model = _mlp()
    _skills(model)
    router = Poly.for_model(model, ("a", "b"), n_tasks=1, mixing="parameter")
    x = torch.randn(3, 6)
    for _ in range(2):
        with router.scope(model, {"task_ids": [0, 0, 0]}):
            first = model(x)
    assert len(model[0]._forward_hooks) == 1
    with dk.disabled(model):
        assert torch.allclose(model(x), nn.Sequential(model[0].base, model[1], model[2].base)(x))
    twin = copy.deepcopy(model)  # the copy keeps one hook, not two, after routing again
    with router.scope(twin, {"task_ids": [0, 0, 0]}):
        assert torch.allclose(twin(x), first, atol=1e-6)
    assert len(twin[0]._forward_hooks) == 1


# ---------------------------------------------------------------- a causal LM, as the benchmark runs it
def _llama_with_skills(seed: int = 0) -> nn.Module:
    from tests.conftest import make_model
    model = make_model("llama", seed)
    torch.manual_seed(seed + 1)
    _skills(model, names=("a", "b"), r=2, targets=("q_proj", "v_proj"))
    return model


def _lm_rows(seed: int, n: int) -> list[dict]:
    """Instruction-dataset-like items: token lists of different lengths, loss on the tail."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 64, (4 + i % 3,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


@pytest.mark.parametrize("mixing", ["output", "parameter"])
def test_causal_lm_default_loss_and_gradient_checkpointing_agree(mixing):
    from types import SimpleNamespace

    from deltakit.train.instruct import InstructionDataset
    collate = functools.partial(InstructionDataset.collate, SimpleNamespace(pad_id=2))
    data = {"t0": _lm_rows(0, 6), "t1": _lm_rows(1, 6)}
    got, calls = [], []
    for checkpointing in (False, True):
        model = _llama_with_skills()
        n = [0]
        model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        router = MHR.fit_routing(model, ("a", "b"), data, steps=3, batch_size=4, collate=collate, heads=2,
                                 mixing=mixing, fit_options={"gradient_checkpointing": checkpointing})
        assert router.layers == tuple(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
        got.append(router.routing.logits.detach().clone())
        calls.append(n[0])
        assert not model.is_activation_checkpointing  # switched off again
    assert calls[1] > calls[0]  # checkpointing did recompute the layers in backward
    init = MHR.for_model(_llama_with_skills(), ("a", "b"), n_tasks=2, heads=2).routing.logits
    assert not torch.allclose(got[0], init, atol=1e-3)  # the default loss (model(**batch).loss) trained it
    assert torch.allclose(got[0], got[1], atol=1e-6)  # the recompute saw the same routing and noise
