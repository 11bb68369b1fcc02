"""Callback state is part of a training checkpoint: AdaLoRA / IncreLoRA budgets and LISA's layer
sampling resume to the bit-identical adapter, and a callback whose state fit cannot save makes
resume an error."""
import json

import pytest
import torch

import deltakit as dk
from deltakit.io.tensors import load_tensors
from deltakit.methods.adalora import AdaLoraConfig
from deltakit.methods.increlora import IncreLoraConfig
from deltakit.methods.lisa import LisaConfig
from deltakit.train import fit
from tests.conftest import make_model
from tests.train.train_helpers import token_label_loader as _loader




class _Crash(Exception):
    pass


class _CrashAt:
    """Raises after step ``at`` (before that step's checkpoint), as a kill would."""

    stateless = True

    def __init__(self, at):
        self.at = at

    def on_step(self, step, model):
        if step == self.at:
            raise _Crash


def _train(config, ckpt_dir, steps, crash_at=None, ckpt_every=None):
    """Attach ``config`` to a fresh tiny BERT and fit it with the method's own hooks; returns (model, callbacks)."""
    model = make_model("bert")
    ad = dk.attach(model, config)
    params, callbacks = ad.training_hooks(loader=_loader(), total_steps=steps)
    extra = [_CrashAt(crash_at)] if crash_at is not None else []
    fit(model, _loader(), lr=1e-2, max_steps=steps, progress=False, params=params, callbacks=[*callbacks, *extra],
        ckpt_dir=ckpt_dir, ckpt_every=ckpt_every, keep_last=0)
    return model, callbacks


def _resumed_equals_uninterrupted(tmp_path, config, steps, ckpt_every, crash_at):
    ref, ref_cbs = _train(config, tmp_path / "ref", steps)
    with pytest.raises(_Crash):
        _train(config, tmp_path / "cut", steps, crash_at=crash_at, ckpt_every=ckpt_every)
    assert max(p.name for p in (tmp_path / "cut").iterdir()) == f"step-{(crash_at - 1) // ckpt_every * ckpt_every:08d}"
    model, cbs = _train(config, tmp_path / "cut", steps, ckpt_every=ckpt_every)  # resumes
    want, got = ref.state_dict(), model.state_dict()  # parameters and buffers (rank states) alike
    assert list(want) == list(got)
    for n in want:
        assert torch.equal(want[n], got[n]), n
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert a.requires_grad == b.requires_grad, n
    return ref_cbs, cbs


@pytest.mark.parametrize("ckpt_every,crash_at", [(4, 6), (8, 9)])  # mid-schedule; after the budget is fixed
def test_adalora_resumes_to_the_bit_identical_adapter(tmp_path, ckpt_every, crash_at):
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10)
    (ref,), (got,) = _resumed_equals_uninterrupted(tmp_path, cfg, 10, ckpt_every, crash_at)
    assert got.rank_pattern() == ref.rank_pattern() and got.total_rank() == 2 * len(got.deltas)
    assert got.finished and ref.finished
    names = load_tensors(tmp_path / "cut" / f"step-{ckpt_every:08d}" / "callback-0.safetensors")
    assert {n.split("/")[0] for n in names} == {"state", "sensitivity"}  # rank masks and EMAs, as tensors
    for k in ref.sensitivity.i_bar:
        assert torch.equal(got.sensitivity.i_bar[k], ref.sensitivity.i_bar[k]), k


def test_increlora_resumes_to_the_bit_identical_adapter(tmp_path):
    cfg = IncreLoraConfig(init_r=1, target_r=3, max_r=4, incre_r=1, top_h=1, deltaT=2)
    (ref,), (got,) = _resumed_equals_uninterrupted(tmp_path, cfg, 10, 4, 6)
    assert got.rank_pattern() == ref.rank_pattern() and got.total_rank() > len(got.deltas)  # it grew
    assert (got.i_bar, got.u_bar, got.finished) == (ref.i_bar, ref.u_bar, ref.finished)


def test_lisa_resumes_to_the_bit_identical_adapter(tmp_path):
    cfg = LisaConfig(gamma=1, period=3, exclude=("position_embeddings",))
    (ref,), (got,) = _resumed_equals_uninterrupted(tmp_path, cfg, 9, 4, 6)
    assert got.active == ref.active and got.rng.getstate() == ref.rng.getstate()


class _Counter:
    """A callback with state (the steps it saw) that fit has no way to save."""

    def __init__(self):
        self.seen = 0

    def on_step(self, step, model):
        self.seen += 1


class _Stateless:
    stateless = True

    def on_step(self, step, model):
        pass


def _linear_fit(ckpt_dir, callbacks, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(16, 4)
    data = [{"x": a, "labels": b} for a, b in zip(x, (x[:, 0] > 0).long())]
    return fit(model, torch.utils.data.DataLoader(data, batch_size=4), lr=1e-2, max_steps=steps, progress=False,
               loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["labels"]),
               ckpt_dir=ckpt_dir, ckpt_every=2, callbacks=callbacks)


def test_resume_with_a_callback_fit_cannot_save_is_an_error(tmp_path):
    _linear_fit(tmp_path, [_Counter()], steps=2)      # writing is fine: only resuming would lose state
    with pytest.raises(ValueError, match=r"^cannot resume .*step-00000002: callback _Counter may hold state "
                                         r"that is not checkpointed; expected it to define state_dict\(\) and "
                                         r"load_state_dict\(\), or to declare stateless = True$"):
        _linear_fit(tmp_path, [_Counter()])
    assert _linear_fit(tmp_path, [_Stateless()]).steps == 4  # declared stateless: resumes


def test_resume_with_other_stateful_callbacks_than_saved_is_an_error(tmp_path):
    def lisa_fit(with_callbacks):
        model = make_model("bert")
        ad = dk.attach(model, LisaConfig(gamma=1, period=3, exclude=("position_embeddings",)))
        params, callbacks = ad.training_hooks()
        return fit(model, _loader(), lr=1e-2, max_steps=4, progress=False, params=params, ckpt_dir=tmp_path,
                   ckpt_every=2, callbacks=[*callbacks, _CrashAt(3)] if with_callbacks else [_Stateless()])

    with pytest.raises(_Crash):
        lisa_fit(with_callbacks=True)
    with pytest.raises(ValueError, match=r"^cannot resume .*step-00000002: expected the stateful callbacks "
                                         r"\['LisaSchedule'\] it was saved with, found \[\]$"):
        lisa_fit(with_callbacks=False)


class _Opaque(_Counter):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def state_dict(self):
        return {"seen": self.seen, "value": self.value}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_callback_state_that_is_neither_tensor_nor_json_is_refused_not_pickled(tmp_path):
    with pytest.raises(ValueError, match=r"expected a tensor or a JSON value at _Opaque.state_dict\(\)\['value'\], "
                                         r"found object"):
        _linear_fit(tmp_path / "a", [_Opaque(object())])
    with pytest.raises(ValueError, match=r"at _Opaque.state_dict\(\)\['value'\], found float \(Out of range float"):
        _linear_fit(tmp_path / "b", [_Opaque(float("nan"))])
    _linear_fit(tmp_path / "c", [_Opaque(1.5)], steps=2)
    saved = json.loads((tmp_path / "c" / "step-00000002" / "trainer_state.json").read_text())
    assert saved["extra"]["callbacks"] == [{"class": "_Opaque", "state": {"seen": 2, "value": 1.5}}]
    assert not list((tmp_path / "c" / "step-00000002").glob("callback-*"))  # no tensors, no file
    resumed = _Opaque(0.0)
    assert _linear_fit(tmp_path / "c", [resumed]).steps == 4 and resumed.seen == 2 + 2  # restored, then 2 more
