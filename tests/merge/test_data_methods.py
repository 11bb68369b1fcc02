"""Data-driven pieces: Fisher / Gram estimation, AdaMerging, CMA-ES coefficient search."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deltakit.merge import (MergePlan, adamerging, collect_grams, estimate_fisher, evolve_coefficients,
                            get_merge, merge_checkpoints, stack_stats)
from deltakit.taskvec import LazyCheckpoint, TaskVector


def test_estimate_fisher_matches_squared_gradients():
    # y = w x, loss = (w x - y)^2 -> dL/dw = 2 (w x - y) x ; F = mean over single-example batches
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    data = [(torch.tensor([[2.0]]), torch.tensor([[3.0]])), (torch.tensor([[1.0]]), torch.tensor([[-1.0]]))]
    f = estimate_fisher(model, data, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).sum())
    g1, g2 = 2 * (0.5 * 2 - 3) * 2, 2 * (0.5 * 1 + 1) * 1  # -8, 3
    assert torch.allclose(f["weight"], torch.tensor([[(g1 ** 2 + g2 ** 2) / 2]]))
    assert model.weight.grad is None


def test_collect_grams_and_fisher_merge_through_executor(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 7, 3)
    grams = collect_grams(net, [x[:2], x[2:]])
    flat = x.reshape(-1, 3)
    assert torch.allclose(grams["0.weight"], flat.T @ flat, atol=1e-4)
    h = torch.relu(net[0](flat))
    assert torch.allclose(grams["2.weight"], h.T @ h, atol=1e-4)
    # Fisher-weighted merge of two "models" through the streaming executor
    a = {"w": torch.tensor([1.0, 1.0])}
    b = {"w": torch.tensor([3.0, 3.0])}
    stats = stack_stats("fisher", [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}])
    fisher = get_merge("fisher")
    plan = MergePlan(method=fisher, config_for=lambda n, l, L: fisher.config(fisher_floor=0.0), stats_for=stats)
    out = merge_checkpoints([a, b], tmp_path / "out", plan, progress=False)
    assert torch.allclose(LazyCheckpoint(out).get("w"), torch.tensor([2.5, 1.5]))


def test_collect_grams_drops_padding_rows():
    """With an attention mask, padded positions do not enter G (they are not real inputs)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, attention_mask):
            return self.lin(x)

    net = Net()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = collect_grams(net, [{"x": x, "attention_mask": mask}])["lin.weight"]
    real = x[mask.bool()]                                       # (5, 3)
    torch.testing.assert_close(g, real.T @ real, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(g, x.reshape(-1, 3).T @ x.reshape(-1, 3), atol=1e-3)


def test_regmean_without_any_gram_is_an_error(tmp_path):
    """Without statistics RegMean would be the plain mean under another name: refuse."""
    from deltakit.merge import MergeConfigError, merge_task_vectors

    a = {"0.weight": torch.randn(2, 3)}
    b = {"0.weight": torch.randn(2, 3)}
    tvs = [TaskVector.from_mapping(a), TaskVector.from_mapping(b)]
    with pytest.raises(MergeConfigError, match="gram"):
        merge_task_vectors("regmean", tvs)
    rm = get_merge("regmean")
    with pytest.raises(MergeConfigError, match="collect_grams"):
        merge_checkpoints([a, b], tmp_path / "out", MergePlan(method=rm, config_for=lambda n, l, L: rm.config()),
                          progress=False)
    assert not (tmp_path / "out").exists()
    g = stack_stats("gram", [{"0.weight": torch.eye(3)}, {"0.weight": torch.eye(3)}])
    merged = merge_task_vectors("regmean", tvs, stats_for=g)        # identity Grams: the mean
    torch.testing.assert_close(merged.dense("0.weight", torch.float32), (a["0.weight"] + b["0.weight"]) / 2)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_prefers_the_task_vector_that_sharpens_predictions(granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sharpen = TaskVector.from_mapping({"2.weight": 2.0 * base["2.weight"], "2.bias": 2.0 * base["2.bias"],
                                       "0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8)})
    noise = TaskVector.from_mapping({k: 0.01 * torch.randn_like(v) for k, v in base.items()})
    batches = [torch.randn(16, 4) for _ in range(4)]
    res = adamerging(model, [sharpen, noise], batches, granularity=granularity, steps=60, lr=0.05,
                     forward=lambda m, b: m(b))
    assert res.history[-1] < res.history[0]
    lam = res.coefficients if granularity == "task" else res.coefficients[:, res.names.index("2.weight")]
    assert lam[0] > 0.9  # pushed to the clamp's upper end
    assert torch.equal(model.state_dict()["2.weight"], base["2.weight"])  # base model untouched
    merged = res.task_vector([sharpen, noise])
    assert merged["2.weight"].shape == (3, 8)


def test_adamerging_multi_task_steps_sum_each_tasks_entropy():
    """A step holding a batch of every task (forward returns one logits tensor per task) is the
    paper's objective: the sum of per-task mean entropies; a task whose head only its own task
    vector sharpens still pulls its coefficient up when the other task's batch is in the step."""
    from deltakit.merge._adamerging import objective, prediction_entropy

    a, b = torch.randn(5, 3), torch.randn(7, 2)
    torch.testing.assert_close(objective([a, b]), prediction_entropy(a) + prediction_entropy(b))
    torch.testing.assert_close(objective(a), prediction_entropy(a))
    with pytest.raises(ValueError, match="at least one task"):
        objective([])

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.x, self.y = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, batch):
            return [self.x(batch["x"]), self.y(batch["y"])]

    torch.manual_seed(0)
    model = TwoHeads()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tv_x = TaskVector.from_mapping({"x.weight": 2.0 * base["x.weight"], "y.weight": torch.zeros(3, 4)})
    tv_y = TaskVector.from_mapping({"x.weight": torch.zeros(3, 4), "y.weight": 2.0 * base["y.weight"]})
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8, 4)} for _ in range(3)]
    res = adamerging(model, [tv_x, tv_y], batches, granularity="task", steps=40, lr=0.05,
                     forward=lambda m, b: m(b))
    assert res.history[-1] < res.history[0]
    assert bool((res.coefficients > 0.9).all())  # both tasks' coefficients move, at every step


@pytest.mark.parametrize("backend", ["optuna", "cmaes"])
def test_cmaes_recovers_target_coefficients(backend):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.w": torch.randn(6, generator=g), "model.layers.1.w": torch.randn(6, generator=g)}
    t1 = TaskVector.from_mapping({k: torch.randn(6, generator=g) for k in base})
    t2 = TaskVector.from_mapping({k: torch.randn(6, generator=g) for k in base})
    target = {k: base[k] + 0.8 * t1[k] + 0.2 * t2[k] for k in base}

    def objective(sd):
        return -sum(float(((sd[k] - target[k]) ** 2).sum()) for k in target)

    res = evolve_coefficients(base, [t1, t2], objective, granularity="task", n_trials=120, init=0.5,
                              sigma0=0.3, seed=0, backend=backend)
    assert res.best_value > -0.05
    assert abs(res.coefficients["all"][0] - 0.8) < 0.1 and abs(res.coefficients["all"][1] - 0.2) < 0.1
