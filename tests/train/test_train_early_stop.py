"""Early stopping: stops after `patience` evaluations without improvement, leaves the best parameters,
and a resumed run stops where the uninterrupted one does."""
import pytest
import torch
from torch.utils.data import DataLoader

from deltakit.train import EarlyStopping, fit


from tests.train.train_helpers import linear_loss as _loss  # noqa: E402
from tests.train.train_helpers import linear_model as _model  # noqa: E402
from tests.train.train_helpers import linear_rows as _data  # noqa: E402


def test_early_stopping_counts_evaluations_without_strict_improvement():
    w = torch.nn.Parameter(torch.zeros(2))
    stop = EarlyStopping("eval_accuracy", patience=2)
    seen = []
    for step, acc in [(1, 0.5), (2, 0.7), (3, 0.7), (4, 0.8), (5, 0.6), (6, 0.8)]:
        with torch.no_grad():
            w.fill_(step)
        seen.append(stop.update(step, {"eval_accuracy": acc, "eval_loss": 1.0}, {"w": w}))
    assert seen == [False, False, False, False, False, True]  # a tie (0.7, 0.8) is not an improvement
    assert (stop.best, stop.best_step, stop.bad) == (0.8, 4, 2)
    stop.restore({"w": w})
    assert w.tolist() == [4.0, 4.0]
    loss = EarlyStopping("eval_loss", patience=1)
    assert loss.mode == "min" and [loss.update(s, {"eval_loss": v}, {}) for s, v in [(1, 2.0), (2, 1.0), (3, 1.5)]] \
        == [False, False, True]
    with pytest.raises(ValueError, match=r"expected the early-stopping metric 'eval_mcc' among the evaluation "
                                         r"results, found \['eval_loss'\]"):
        EarlyStopping("eval_mcc", 1).update(1, {"eval_loss": 1.0}, {})
    with pytest.raises(ValueError, match="patience >= 1, found 0"):
        EarlyStopping("eval_mcc", 0)


class _Clock:
    """Records the step (callbacks run before the evaluation) and the parameters after every step."""

    def __init__(self):
        self.step, self.params = 0, {}

    def on_step(self, step, model):
        self.step = step
        self.params[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def state_dict(self):  # the step (the scripted evaluation reads it); the snapshots are the test's own
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


SCRIPT = {2: 0.6, 4: 0.8, 6: 0.7, 8: 0.75, 10: 0.9, 12: 0.95}  # eval every 2 steps; patience 2 stops at 8


def _scripted_fit(model, clock, *more_callbacks, **kw):
    return fit(model, DataLoader(_data(), batch_size=4, shuffle=True), lr=1e-2, max_steps=12, eval_every=2,
               loss_fn=_loss, progress=False, callbacks=[clock, *more_callbacks], early_stopping_patience=2,
               eval_fn=lambda m: {"accuracy": SCRIPT[clock.step], "loss": 1.0 / clock.step}, **kw)


def test_fit_stops_early_and_leaves_the_best_parameters():
    model, clock = _model(), _Clock()
    res = _scripted_fit(model, clock)
    assert res.steps == 8 and res.best_step == 4 and max(clock.params) == 8
    assert res.metrics["eval_accuracy"] == 0.8 and res.metrics["eval_loss"] == 0.25
    for n, p in model.named_parameters():
        assert torch.equal(p, clock.params[4][n]), n
        assert not torch.equal(p, clock.params[8][n]), n
    assert [h["step"] for h in res.history if "eval_accuracy" in h] == [2, 4, 6, 8]


def test_early_stopping_on_loss_and_argument_errors():
    model, clock = _model(), _Clock()
    res = _scripted_fit(model, clock, early_stopping_metric="loss")  # 1/step keeps falling: runs to the end
    assert res.steps == 12 and res.best_step == 12
    with pytest.raises(ValueError, match="expected eval_every and an eval_loader / eval_fn with "
                                         "early_stopping_patience, found eval_every=None and an evaluation"):
        fit(_model(), DataLoader(_data(), batch_size=4), max_steps=2, loss_fn=_loss, progress=False,
            eval_fn=lambda m: {"accuracy": 1.0}, early_stopping_patience=1)


class _Crash(Exception):
    pass


def test_resumed_run_stops_where_the_uninterrupted_one_does(tmp_path):
    ref_model, ref_clock = _model(), _Clock()
    ref = _scripted_fit(ref_model, ref_clock)

    class CrashAt7:
        stateless = True

        def on_step(self, step, model):
            if step == 7:
                raise _Crash

    with pytest.raises(_Crash):  # the step-6 checkpoint holds the best (step-4) parameters as extra tensors
        _scripted_fit(_model(), _Clock(), CrashAt7(), ckpt_dir=tmp_path, ckpt_every=3)
    assert (tmp_path / "step-00000006" / "best.safetensors").is_file()
    model = _model()
    res = _scripted_fit(model, _Clock(), ckpt_dir=tmp_path, ckpt_every=3)  # _Clock's step is checkpointed
    assert (res.steps, res.best_step, res.metrics) == (ref.steps, ref.best_step, ref.metrics)
    assert res.history == ref.history  # the loss window open at the checkpoint (steps 1-6) was kept
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    # the stop was checkpointed: running again is a no-op that gives the same best model
    again = _model()
    res2 = _scripted_fit(again, _Clock(), ckpt_dir=tmp_path, ckpt_every=3)
    assert res2.steps == 8 and res2.best_step == 4
    for (n, a), (_, b) in zip(ref_model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
