"""Training fails loudly: a non-finite loss, gradient, parameter or evaluation stops fit with the step,
before a checkpoint can hold it."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from deltakit.train import TrainingDivergedError, fit
from deltakit.train.checkpoint import latest_checkpoint
from deltakit.train.loop import _count_tokens


from tests.train.train_helpers import linear_loss as _loss  # noqa: E402
from tests.train.train_helpers import linear_model as _model  # noqa: E402
from tests.train.train_helpers import linear_rows as _data  # noqa: E402


def _nan_from(step_call):
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        loss = _loss(m, b)
        return loss * float("nan") if calls["n"] >= step_call else loss
    return loss_fn


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _model()
    with pytest.raises(TrainingDivergedError, match=r"^training diverged at step 5: the loss is nan; nothing was "
                                                    r"saved from it and the last good checkpoint .*step-00000004 is "
                                                    r"kept") as e:
        fit(model, DataLoader(_data(), batch_size=4), lr=1e-2, max_steps=8, ckpt_dir=tmp_path, ckpt_every=2,
            loss_fn=_nan_from(5), progress=False)
    assert e.value.step == 5 and e.value.last_checkpoint == latest_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not applied
    history = json.loads((tmp_path / "step-00000004" / "trainer_state.json").read_text())["extra"]["history"]
    assert [h["step"] for h in history] == []  # log_every=10: nothing logged yet, and nothing NaN


def test_nan_loss_with_grad_accum_and_no_checkpoint_dir():
    with pytest.raises(TrainingDivergedError, match=r"at step 3: the loss is nan; .* no checkpoint was written"):
        # grad_accum 2: the 5th loss call is the first micro-batch of step 3
        fit(_model(), DataLoader(_data(), batch_size=4), max_steps=8, grad_accum=2, loss_fn=_nan_from(5),
            progress=False)


def test_huge_learning_rate_diverges_instead_of_saving_inf(tmp_path):
    """AdamW multiplies the weight by (1 - lr * wd) = -1e36 each step: ~1e37 after step 1, inf after step 2
    (float32 ends at 3.4e38). The bias has no decay and stays finite."""
    from deltakit.io.files import load_tensors
    with pytest.raises(TrainingDivergedError, match=r"at step 2: 1 of 2 trainable parameters are not finite "
                                                    r"\(first: weight\)") as e:
        fit(_model(), DataLoader(_data(), batch_size=8), lr=1e37, weight_decay=0.1, max_steps=20,
            schedule="constant", ckpt_dir=tmp_path, ckpt_every=1, loss_fn=_loss, progress=False)
    assert e.value.last_checkpoint.name == "step-00000001"
    saved = load_tensors(e.value.last_checkpoint / "trainable.safetensors")
    assert 1e35 < saved["weight"].abs().max() < 3.4e38 and all(torch.isfinite(t).all() for t in saved.values())


class _Poison:
    """A callback that writes inf into the weight after step ``at`` (as a bad schedule could)."""

    def __init__(self, at):
        self.at = at

    def on_step(self, step, model):
        if step == self.at:
            with torch.no_grad():
                model.weight[0, 1] = float("inf")


def test_non_finite_parameter_is_caught_at_the_next_log_or_checkpoint(tmp_path):
    kw = dict(lr=1e-2, max_steps=8, loss_fn=_loss, progress=False, callbacks=[_Poison(3)])
    with pytest.raises(TrainingDivergedError, match=r"at step 3: 1 of 2 trainable parameters are not finite "
                                                    r"\(first: weight\)"):
        fit(_model(), DataLoader(_data(), batch_size=4), log_every=1, **kw)
    # checked before the step-4 checkpoint is written (log_every=10 would not log until step 8)
    kw["callbacks"] = [_Poison(4)]
    with pytest.raises(TrainingDivergedError, match=r"at step 4: 1 of 2 .* last good checkpoint .*step-00000002"):
        fit(_model(), DataLoader(_data(), batch_size=4), ckpt_dir=tmp_path, ckpt_every=2, **kw)
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_non_finite_gradient_norm_is_caught_before_the_update():
    def loss_fn(m, b):  # a finite loss whose gradient is inf: d sqrt(x) / dx at x = 0
        w = m.weight[0, 0]
        return _loss(m, b) + torch.sqrt(w - w.detach())

    model = _model()
    before = model.weight.detach().clone()
    with pytest.raises(TrainingDivergedError, match=r"at step 1: the gradient norm is inf"):
        fit(model, DataLoader(_data(), batch_size=4), max_steps=2, loss_fn=loss_fn, progress=False)
    assert torch.equal(model.weight, before)


def test_non_finite_evaluation_is_divergence():
    with pytest.raises(TrainingDivergedError, match=r"at step 2: the evaluation gave \{'eval_loss': inf\}"):
        fit(_model(), DataLoader(_data(), batch_size=4), max_steps=4, eval_every=2, loss_fn=_loss, progress=False,
            eval_fn=lambda m: {"accuracy": 0.5, "loss": float("inf")})


def test_tokens_are_non_padding_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert _count_tokens({"input_ids": torch.ones(2, 4), "attention_mask": mask}) == 5
    assert _count_tokens({"input_ids": torch.ones(2, 4)}) == 8
    assert _count_tokens({"x": torch.ones(2, 4)}) == 0


def test_plain_progress_lines_show_loss_lr_throughput_and_eta(capsys):
    fit(_model(), DataLoader(_data(), batch_size=4), lr=1e-2, max_steps=4, log_every=2, loss_fn=_loss)
    lines = capsys.readouterr().out.splitlines()  # stderr is not a tty under pytest: one line per log step
    assert len(lines) == 2
    assert all(l.startswith(f"step {s}/4 loss ") and " lr " in l and " tok/s eta " in l for l, s in zip(lines, (2, 4)))
    assert lines[-1].endswith("eta 00:00")
