import pytest
import torch
from train_helpers import freeze_all_but, tiny_bert
from torch.utils.data import DataLoader

from deltakit.train import TrainResult, evaluate, fit, trainable_parameters
from deltakit.train.checkpoint import latest_checkpoint
from deltakit.train.loop import make_scheduler

TRAIN = ("classifier", "layer.1.attention")


def _model(dropout=0.1):
    m = tiny_bert(dropout=dropout)
    freeze_all_but(m, *TRAIN)
    return m


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trains_only_trainable_and_loss_goes_down(rows):
    model = _model()
    before = _snapshot(model)
    res = fit(model, DataLoader(rows, batch_size=8, shuffle=True), lr=3e-3, max_steps=30,
              log_every=5, progress=False, schedule="constant",
              eval_loader=DataLoader(rows, batch_size=16), metric=["accuracy", "mcc"])
    assert isinstance(res, TrainResult) and res.steps == 30
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert {"eval_accuracy", "eval_mcc", "eval_loss", "train_loss"} <= set(res.metrics)
    trainable = set(trainable_parameters(model))
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # frozen base: bit-identical


class _Crash(Exception):
    pass


def _crash_after(n_calls):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise _Crash
        return model(**batch).loss
    return loss_fn


@pytest.mark.parametrize("grad_accum,schedule", [(1, "linear"), (2, "cosine")])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, rows, grad_accum, schedule):
    kw = dict(lr=2e-3, max_steps=10, grad_accum=grad_accum, schedule=schedule, warmup_steps=2,
              weight_decay=0.1, progress=False, seed=3, log_every=2)
    loader = DataLoader(rows, batch_size=5, shuffle=True)  # 10 batches/epoch: crosses an epoch
    straight = _model()
    ref = fit(straight, loader, **kw)

    crashed = _model()
    with pytest.raises(_Crash):  # dies during step 7, after the step-6 checkpoint
        fit(crashed, loader, ckpt_dir=tmp_path, ckpt_every=3, loss_fn=_crash_after(6 * grad_accum), **kw)
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    resumed = _model()
    res = fit(resumed, loader, ckpt_dir=tmp_path, ckpt_every=3, **kw)
    assert res.steps == 10
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], abs=1e-6)
    # keep_last=2 pruned the older checkpoints
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == \
        ["step-00000009", "step-00000010"]


def test_resume_of_finished_run_is_a_no_op(tmp_path, rows):
    loader = DataLoader(rows, batch_size=8)
    m = _model()
    fit(m, loader, lr=1e-3, max_steps=4, ckpt_dir=tmp_path, progress=False)
    again = _model()
    res = fit(again, loader, lr=1e-3, max_steps=4, ckpt_dir=tmp_path, progress=False)
    assert res.steps == 4
    for (n, a), (_, b) in zip(m.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="expected an empty ckpt_dir with resume=False, found .*step-00000004"):
        fit(_model(), loader, lr=1e-3, max_steps=4, ckpt_dir=tmp_path, resume=False, progress=False)


def test_grad_accum_equals_bigger_batch(rows):
    a, b = _model(dropout=0.0), _model(dropout=0.0)
    kw = dict(lr=1e-3, max_steps=6, progress=False, max_grad_norm=None)
    fit(a, DataLoader(rows, batch_size=8, shuffle=True), **kw)
    fit(b, DataLoader(rows, batch_size=4, shuffle=True), grad_accum=2, **kw)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=n)


def test_plain_module_with_loss_fn_and_epochs():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = [{"x": xi, "labels": yi} for xi, yi in zip(x, (x[:, 0] > 0).long())]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["labels"])
    res = fit(model, DataLoader(data, batch_size=16, shuffle=True), epochs=3, lr=0.05, loss_fn=loss_fn,
              progress=False, schedule="constant", log_every=1)
    assert res.steps == 12 and len([h for h in res.history if "loss" in h]) == 12
    assert torch.equal(model[0].weight, frozen)


def test_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = {}
    for name in ("constant", "linear", "cosine"):
        sched = make_scheduler(opt, name, warmup_steps=2, total_steps=10)
        lrs[name] = [sched.lr_lambdas[0](s) for s in range(11)]
    assert lrs["constant"][:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs["constant"][-1] == 1.0
    assert lrs["linear"][2] == 1.0 and lrs["linear"][6] == pytest.approx(0.5) and lrs["linear"][10] == 0.0
    assert lrs["cosine"][6] == pytest.approx(0.5) and lrs["cosine"][10] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="expected schedule in"):
        make_scheduler(opt, "step", 0, 10)


def test_bad_input_is_one_clear_line(rows):
    loader = DataLoader(rows, batch_size=8)
    with pytest.raises(ValueError, match="exactly one of max_steps / epochs"):
        fit(_model(), loader, progress=False)
    frozen = tiny_bert()
    freeze_all_but(frozen)
    with pytest.raises(ValueError, match="requires_grad=True, found none"):
        fit(frozen, loader, max_steps=1, progress=False)
    nolabels = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    with pytest.raises(ValueError, match="expected a 'labels' key"):
        fit(_model(), DataLoader(nolabels, batch_size=8), max_steps=1, progress=False)


def test_evaluate_leaves_mode_and_rng_alone(rows):
    model = _model()
    model.train()
    state = torch.get_rng_state()
    out = evaluate(model, DataLoader(rows, batch_size=16, shuffle=True), ["accuracy", "f1", "mcc"])
    assert model.training and torch.equal(state, torch.get_rng_state())
    assert set(out) == {"accuracy", "f1", "mcc", "loss"} and 0 <= out["accuracy"] <= 1
    with pytest.raises(ValueError, match="expected metric in"):
        evaluate(model, [], "auc")


def test_resume_with_other_batch_size_warns_and_continues(tmp_path, rows):
    fit(_model(), DataLoader(rows, batch_size=8), lr=1e-3, max_steps=2, ckpt_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match=r"different data order .*'batch_size': \(8, 4\)"):
        res = fit(_model(), DataLoader(rows, batch_size=4), lr=1e-3, max_steps=4, ckpt_dir=tmp_path,
                  progress=False, log_every=1)
    assert res.steps == 4 and [h["step"] for h in res.history] == [2, 3, 4]


@pytest.mark.parametrize("how", ["argument", "outer_block"])
def test_autocast_forward_sees_the_updated_weights(how):
    """torch.autocast caches the bf16 cast of each leaf weight for the whole block; a training
    loop inside one block would keep running the initial weights (a flat loss). fit's
    ``autocast=`` casts per step, and an outer block has its cache cleared after each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    loader = DataLoader([{"x": x[i], "labels": y[i]} for i in range(16)], batch_size=16)  # one full batch

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]).float(), b["labels"])

    kw = dict(lr=1e-2, max_steps=30, log_every=1, progress=False, schedule="constant", loss_fn=loss_fn)
    if how == "argument":
        res = fit(model, loader, autocast=torch.bfloat16, **kw)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = fit(model, loader, **kw)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]   # stale weights would give the same loss at every step
    assert all(p.dtype == torch.float32 for p in model.parameters())
