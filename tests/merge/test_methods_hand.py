"""Hand-worked numbers for every merge method on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from deltakit.merge import MergeConfigError, MergeContext, get_merge, lines_factor
from deltakit.merge.methods.breadcrumbs import BreadcrumbsConfig
from deltakit.merge.methods.cabs import CABSConfig
from deltakit.merge.methods.dare import DareLinearConfig, DareTiesConfig, DarexQConfig
from deltakit.merge.methods.della import DellaLinearConfig
from deltakit.merge.methods.fisher import FisherConfig
from deltakit.merge.methods.linear import LinearConfig
from deltakit.merge.methods.model_stock import ModelStockConfig
from deltakit.merge.methods.multislerp import MultiSlerpConfig
from deltakit.merge.methods.orthogonal import OrthogonalConfig
from deltakit.merge.methods.pcb import PCBConfig
from deltakit.merge.methods.regmean import RegMeanConfig
from deltakit.merge.methods.slerp import SlerpConfig
from deltakit.merge.methods.task_arithmetic import TaskArithmeticConfig
from deltakit.merge.methods.ties import TiesConfig

T = torch.tensor


def test_ties_3x4_on_paper():
    # K=3 task vectors of 4 entries, density 0.5 -> keep the 2 largest |tau| of each:
    #   tau1 = [ 4, -1,  2, -3] -> [ 4,  0, 0, -3]
    #   tau2 = [-2,  5, -1,  1] -> [-2,  5, 0,  0]
    #   tau3 = [ 5, -4,  1,  6] -> [ 5,  0, 0,  6]
    # elected sign = sign(column sums) = sign([7, 5, 0, 3]) = [+, +, + (0 counts as +), +]
    # disjoint mean over agreeing entries: [(4+5)/2, 5/1, 0 (nobody agrees), 6/1] = [4.5, 5, 0, 6]
    tau = T([[4., -1, 2, -3], [-2, 5, -1, 1], [5, -4, 1, 6]])
    base = T([1., 1, 1, 1])
    out = get_merge("ties")(tau, base, TiesConfig(density=0.5))
    assert torch.equal(out, base + T([4.5, 5, 0, 6]))
    # weights (1, 2, 1): tau2 doubles to [-4, 10, 0, 0]; sums [5, 10, 0, 3] keep the same signs and
    # the disjoint mean divides by the agreeing weights: [(4+5)/2, 10/2, 0, 6/1] -> same numbers
    out_w = get_merge("ties")(tau, base, TiesConfig(density=0.5, weights=(1, 2, 1)))
    assert torch.equal(out_w, base + T([4.5, 5, 0, 6]))
    # lam scales the merged task vector
    assert torch.equal(get_merge("ties")(tau, base, TiesConfig(density=0.5, lam=0.5)), base + T([2.25, 2.5, 0, 3]))


def test_task_arithmetic():
    # 1 + 2 * (0.5 * [1, 2] + 1 * [3, -1]) = 1 + 2 * [3.5, 0] = [8, 1]
    out = get_merge("task_arithmetic")(T([[1., 2], [3, -1]]), T([1., 1]),
                                       TaskArithmeticConfig(weights=(0.5, 1.0), lam=2.0))
    assert torch.equal(out, T([8., 1]))


def test_linear_weighted_average():
    # (1 * [1, 2] + 3 * [3, 6]) / 4 = [2.5, 5]
    m = get_merge("linear")
    assert torch.equal(m(T([[1., 2], [3, 6]]), T([0., 0]), LinearConfig(weights=(1, 3))), T([2.5, 5]))
    assert torch.equal(m(T([[1., 2], [3, 6]]), T([0., 0]), LinearConfig(weights=(1, 3), normalize=False)),
                       T([10., 20]))
    with pytest.raises(MergeConfigError, match="weights: expected 2 values"):
        m(T([[1., 2], [3, 6]]), T([0., 0]), LinearConfig(weights=(1, 2, 3)))


def test_breadcrumbs_two_sided_mask():
    # n=10, density 0.6 keeps 6, gamma 0.2 drops the top 2 (9, 10), so the bottom 2 (1, 2) go too
    tau = torch.arange(1., 11).unsqueeze(0)
    out = get_merge("breadcrumbs")(tau, torch.zeros(10), BreadcrumbsConfig(density=0.6, gamma=0.2))
    assert torch.equal(out, T([0., 0, 3, 4, 5, 6, 7, 8, 0, 0]))


def test_dare_drops_and_rescales_by_inverse_density():
    tau = torch.full((1, 20000), 2.0)
    ctx = MergeContext(generator=torch.Generator().manual_seed(0))
    out = get_merge("dare_linear")(tau, torch.zeros(20000), DareLinearConfig(density=0.25), ctx)
    kept = out != 0
    assert torch.all(out[kept] == 8.0)                 # 2 / 0.25
    assert abs(float(kept.float().mean()) - 0.25) < 0.01
    assert abs(float(out.mean()) - 2.0) < 0.05         # unbiased: E[m * tau / p] = tau
    q = get_merge("darex_q")(tau, torch.zeros(20000), DarexQConfig(density=0.25, q=0.5), ctx)
    assert torch.all(q[q != 0] == 4.0)                 # DAREx-q: 2 / q


def test_dare_ties_is_deterministic_given_seed_and_l1_rescale_keeps_mass():
    tau = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    cfg = DareTiesConfig(density=0.5, rescale="l1")
    a = get_merge("dare_ties")(tau, torch.zeros(500), cfg, MergeContext(generator=torch.Generator().manual_seed(7)))
    b = get_merge("dare_ties")(tau, torch.zeros(500), cfg, MergeContext(generator=torch.Generator().manual_seed(7)))
    assert torch.equal(a, b)
    one = get_merge("dare_linear")(tau[:1], torch.zeros(500), DareLinearConfig(density=0.3, rescale="l1"),
                                   MergeContext(generator=torch.Generator().manual_seed(3)))
    assert math.isclose(float(one.abs().sum()), float(tau[0].abs().sum()), rel_tol=1e-5)


def test_della_keep_rate_matches_density():
    tau = torch.randn(1, 40000, generator=torch.Generator().manual_seed(2))
    out = get_merge("della_linear")(tau, torch.zeros(40000), DellaLinearConfig(density=0.4, epsilon=0.2,
                                                                               rescale="none"),
                                    MergeContext(generator=torch.Generator().manual_seed(0)))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    # larger magnitudes are kept more often: top half keep-rate ~0.5, bottom half ~0.3
    order = tau[0].abs().argsort()
    assert float(kept[order[20000:]].float().mean()) > float(kept[order[:20000]].float().mean()) + 0.15


def test_slerp():
    m = get_merge("slerp")
    # orthogonal unit vectors, t = 0.5: sin(pi/4)/sin(pi/2) * (v0 + v1)
    out = m(T([[0., 1]]), T([1., 0]), SlerpConfig(t=0.5))
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]))
    # collinear -> plain lerp
    assert torch.equal(m(T([[2., 0]]), T([1., 0]), SlerpConfig(t=0.5)), T([1.5, 0]))
    with pytest.raises(MergeConfigError, match="expected exactly 1 model"):
        m(T([[2., 0], [1, 1]]), T([1., 0]), SlerpConfig())


def test_multislerp_two_orthogonal_equals_slerp_midpoint():
    # u = e1, e2; mean direction (e1+e2)/sqrt2; tangents cancel; norm 1 -> (e1+e2)/sqrt2
    out = get_merge("multislerp")(T([[1., 0], [0, 1]]), T([0., 0]), MultiSlerpConfig())
    assert torch.allclose(out, T([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)


def test_model_stock():
    m = get_merge("model_stock")
    base = T([0., 0])
    # cos = 0 -> t = 0 -> base;  cos = 1 -> t = 1 -> mean of models
    assert torch.equal(m(T([[1., 0], [0, 1]]), base, ModelStockConfig()), base)
    assert torch.allclose(m(T([[1., 1], [1, 1]]), base, ModelStockConfig()), T([1., 1]))
    # tau = [1, 0], [1, 1]: cos = 1/sqrt2, t = 2c / (1 + c) = 0.828427; mean = [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(m(T([[1., 0], [1, 1]]), base, ModelStockConfig()), T([t, t / 2]), atol=1e-6)


def test_fisher_weighted_average():
    # F1 = [1, 3], F2 = [3, 1]: [(1*1 + 3*3)/4, (3*1 + 1*3)/4] = [2.5, 1.5]
    ctx = MergeContext(stats={"fisher": T([[1., 3], [3, 1]])})
    out = get_merge("fisher")(T([[1., 1], [3, 3]]), T([0., 0]), FisherConfig(fisher_floor=0.0), ctx)
    assert torch.allclose(out, T([2.5, 1.5]))
    with pytest.raises(MergeConfigError, match="expected statistic 'fisher'"):
        get_merge("fisher")(T([[1., 1], [3, 3]]), T([0., 0]))


def test_regmean_recovers_disjoint_features():
    # W1 only sees feature 0, W2 only feature 1: G1 = diag(1, 0), G2 = diag(0, 1)
    # (W1 G1 + W2 G2)(G1 + G2)^-1 = [[1, 1]] while the plain mean is [[0.5, 0.5]]
    w = T([[[1., 0]], [[0., 1]]])
    g = T([[[1., 0], [0, 0]], [[0., 0], [0, 1]]])
    out = get_merge("regmean")(w, torch.zeros(1, 2), RegMeanConfig(alpha=1.0), MergeContext(stats={"gram": g}))
    assert torch.allclose(out, T([[1., 1]]))
    # and it solves the least-squares problem min_W sum_k |X_k W^T - X_k W_k^T|^2 on real data
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 3, generator=gen) for _ in range(2)]
    ws = torch.randn(2, 4, 3, generator=gen)
    grams = torch.stack([x.T @ x for x in xs])
    merged = get_merge("regmean")(ws, torch.zeros(4, 3), RegMeanConfig(alpha=1.0),
                                  MergeContext(stats={"gram": grams}))
    big_x = torch.cat(xs)
    big_y = torch.cat([x @ wk.T for x, wk in zip(xs, ws)])
    lsq = torch.linalg.lstsq(big_x.double(), big_y.double()).solution.T.float()
    assert torch.allclose(merged, lsq, atol=1e-5)


def test_pcb_by_formula():
    # clip=0 disables outlier clipping; K=2, n=4
    tau = T([[1., -2, 0.5, 3], [2, 1, -0.5, 3]])
    out = get_merge("pcb")(tau, torch.zeros(4), PCBConfig(ratio=0.5, clip=0.0))
    # intra_k = exp(2 * minmax(|tau_k|)^2); inter_k = tanh(tau_k * (tau_1 + tau_2))
    mag = tau.abs()
    mm = (mag - mag.min(1, keepdim=True).values) / (mag.max(1, keepdim=True).values - mag.min(1, keepdim=True).values)
    score = torch.exp(2 * mm ** 2) * torch.tanh(tau * tau.sum(0))
    # ratio 0.5 keeps the top 2 of 4 per task: values below the 3rd largest are raised to it (-> 0 after minmax)
    s = torch.stack([torch.clamp(r, min=r.sort().values[2]) for r in score])
    s = (s - s.min(1, keepdim=True).values) / (s.max(1, keepdim=True).values - s.min(1, keepdim=True).values)
    want = (tau * s).sum(0) / s.sum(0).clamp_min(1e-12)
    assert torch.allclose(out, want)
    assert out[3] == 3.0  # both tasks agree on the largest entry: kept as is


def test_cabs_disjoint_nm_masks():
    # 2:4 pruning, task 1 first: groups [4,1,3,2] -> keeps 4,3 ; [9,8,7,6] -> keeps 9,8
    # task 2 may only use what is left (idx 1,3,6,7): [6,2] and [8,9] all kept
    tau = T([[4., 1, 3, 2, 9, 8, 7, 6], [5, 6, 1, 2, 3, 4, 8, 9]])
    out = get_merge("cabs")(tau, torch.zeros(8), CABSConfig(n=2, m=4, weights=(1.0, 0.5)))
    assert torch.equal(out, T([4., 3, 3, 1, 9, 8, 4, 4.5]))
    # order matters: task 2 first keeps 5,6 and 8,9; task 1 gets 3,2 and 9,8
    out2 = get_merge("cabs")(tau, torch.zeros(8), CABSConfig(n=2, m=4, order=(1, 0)))
    assert torch.equal(out2, T([5., 6, 3, 2, 9, 8, 8, 9]))


def test_opcm_vectors_and_matrices():
    m = get_merge("opcm")
    # vectors: running = [3, 4] (|.| = 5), mean norm (3 + 4)/2 = 3.5 -> [2.1, 2.8]
    assert torch.allclose(m(T([[3., 0], [0, 4]]), T([0., 0]), OrthogonalConfig()), T([2.1, 2.8]))
    # matrices: M = diag(2, 1) (U = V = I); tau2 = ones -> drop diag of U^T tau V -> [[0,1],[1,0]]
    # running = [[2,1],[1,1]] (|.| = sqrt7), mean norm (sqrt5 + 2)/2
    out = m(torch.stack([torch.diag(T([2., 1])), torch.ones(2, 2)]), torch.zeros(2, 2), OrthogonalConfig(alpha=0.5))
    want = T([[2., 1], [1, 1]]) * ((math.sqrt(5) + 2) / 2 / math.sqrt(7))
    assert torch.allclose(out, want, atol=1e-6)


def test_lines_factor():
    # lambda(l) = alpha + beta * l / (L - 1)
    assert lines_factor("model.layers.0.mlp.w", 0, 5, 0.2, 0.8) == 0.2
    assert lines_factor("model.layers.2.mlp.w", 2, 5, 0.2, 0.8) == pytest.approx(0.6)
    assert lines_factor("model.layers.4.mlp.w", 4, 5, 0.2, 0.8) == pytest.approx(1.0)
    assert lines_factor("model.embed_tokens.weight", None, 5, 0.2, 0.8) == 0.2
    # outside the blocks: alpha, as the authors' LiNeS_scaling (was alpha + beta for the head)
    assert lines_factor("lm_head.weight", None, 5, 0.2, 0.8) == 0.2
    assert lines_factor("model.norm.weight", None, 5, 0.2, 0.8) == 0.2


# LiNeS on a tiny model: 3 blocks, alpha 0.25, beta 0.5 -> blocks 0.25 / 0.5 / 0.75 and 0.25 for
# everything outside the blocks (embeddings, final norm, LM head, pooler, classifier).
# The two task vectors are 2 and 4 everywhere, linear-averaged to 3, so the merged dW is 3 * factor.
_LINES_WANT = {"model.embed_tokens.weight": 0.75, "model.layers.0.w": 0.75, "model.layers.1.w": 1.5,
               "model.layers.2.w": 2.25, "model.norm.weight": 0.75, "lm_head.weight": 0.75,
               "bert.pooler.dense.weight": 0.75, "classifier.weight": 0.75}


def test_lines_gives_alpha_outside_the_blocks_task_vectors():
    from deltakit.merge import merge_task_vectors
    from deltakit.taskvec import TaskVector

    tvs = [TaskVector.from_mapping({n: torch.full((2, 3), v) for n in _LINES_WANT}) for v in (2.0, 4.0)]
    out = merge_task_vectors("linear", tvs, lines=(0.25, 0.5))
    for n, want in _LINES_WANT.items():
        assert torch.equal(out.get(n), torch.full((2, 3), want)), n


def test_lines_gives_alpha_outside_the_blocks_checkpoints(tmp_path):
    from deltakit.merge import MergePlan, build_config, merge_checkpoints
    from deltakit.taskvec import LazyCheckpoint

    m = get_merge("linear")
    cfg = build_config(m, {})
    base = {n: torch.full((2, 3), 1.0) for n in _LINES_WANT}
    models = [{n: t + v for n, t in base.items()} for v in (2.0, 4.0)]
    plan = MergePlan(method=m, config_for=lambda n, l, L: cfg, lines=(0.25, 0.5))
    out = LazyCheckpoint(merge_checkpoints(models, tmp_path / "out", plan, base=base, progress=False))
    for n, want in _LINES_WANT.items():  # base + factor * (merged - base)
        assert torch.equal(out.get(n), torch.full((2, 3), 1.0 + want)), n


def test_duplicate_registration_is_an_error():
    from dataclasses import dataclass

    from deltakit.merge import register_merge

    @dataclass(frozen=True)
    class C:
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_merge("ties", paper="x", config=C)(lambda *a: None)
    with pytest.raises(TypeError, match="frozen dataclass"):
        register_merge("new_one", paper="x", config=dict)


def test_magnitude_trim_differs_from_a_sort_only_among_threshold_ties():
    from deltakit.merge import SPARSIFY

    # heavy ties: 200k entries drawn from 50 magnitudes
    x = (torch.randint(-50, 51, (200_000,), generator=torch.Generator().manual_seed(0))).float()
    fast = SPARSIFY["magnitude"](x, 0.3, None, 0.0, 0.0)
    exact = SPARSIFY["magnitude_sort"](x, 0.3, None, 0.0, 0.0)
    assert int(fast.sum()) == int(exact.sum()) == 60_000
    assert torch.equal(exact, torch.zeros_like(exact).index_fill_(0, torch.argsort(x.abs(), descending=True)[:60_000], True))
    # both keep the same multiset of magnitudes; they may only disagree on entries at the threshold
    assert torch.equal(x.abs()[fast].sort().values, x.abs()[exact].sort().values)
    thr = x.abs()[fast].min()
    assert bool((x.abs()[fast != exact] == thr).all())
