import json
import re
from pathlib import Path

import pytest
import torch

from deltakit.io.files import DeltakitFileError
from deltakit.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from deltakit.train.loop import make_optimizer, make_scheduler


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(params, lr=0.1, weight_decay=0.1)
    sched = make_scheduler(opt, "cosine", 1, 10)
    return model, params, opt, sched


def _step(model, opt, sched):
    model(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    model, params, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    path = save_checkpoint(tmp_path, params, opt, sched, step=3, extra={"history": [{"step": 3}]})
    assert path.name == "step-00000003" and latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == ["optimizer.safetensors", "rng.safetensors",
                                                     "trainable.safetensors", "trainer_state.json"]
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["params"] == ["1.weight"]  # stored by name

    model2, params2, opt2, sched2 = _setup()  # same frozen base, fresh trainable state
    with torch.no_grad():
        params2["1.weight"].add_(1.0)
    torch.manual_seed(123)
    out = load_checkpoint(path, params2, opt2, sched2)
    assert out["step"] == 3 and out["extra"]["history"] == [{"step": 3}]
    for n in params:
        assert torch.equal(params[n], params2[n])
    assert sched2.get_last_lr() == sched.get_last_lr()
    # same RNG (restored) -> the next step is identical in both
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    _step(model, opt, sched)
    torch.set_rng_state(rng)
    _step(model2, opt2, sched2)
    for n in params:
        assert torch.equal(params[n], params2[n]), n


def test_no_pickle_in_train_package():
    src = Path(__file__).parents[2] / "src" / "deltakit" / "train"
    for f in src.glob("*.py"):
        assert not re.search(r"torch\.(save|load)\(|import pickle|from pickle", f.read_text()), f


def test_mismatched_params_are_one_line(tmp_path):
    model, params, opt, sched = _setup()
    path = save_checkpoint(tmp_path, params, opt, sched, step=1)
    other = torch.nn.Linear(4, 3)
    with pytest.raises(DeltakitFileError, match=r"expected 1\.weight of shape \(3, 4\) in .*step-00000001, found \(2, 4\)"):
        load_checkpoint(path, {"1.weight": other.weight, "1.bias": other.bias})
    with pytest.raises(DeltakitFileError, match=r"missing=\['x'\] unexpected=\['1.bias', '1.weight'\]"):
        load_checkpoint(path, {"x": other.weight})
    (path / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(DeltakitFileError, match="not a readable safetensors file"):
        load_checkpoint(path, params)


def test_incomplete_dirs_are_ignored_and_pruned(tmp_path):
    model, params, opt, sched = _setup()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, params, opt, sched, step=s)
    (tmp_path / "step-00000009").mkdir()  # no trainer_state.json: a crash before the rename
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000009"]
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_failed_load_leaves_params_untouched(tmp_path):
    model, params, opt, sched = _setup()
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path, params, opt, sched, step=1)
    model2, params2, _, _ = _setup()
    before = {n: p.clone() for n, p in params2.items()}
    wrong_opt = torch.optim.SGD(params2.values(), lr=0.1)  # other param-group layout
    with pytest.raises(ValueError, match="parameter groups"):
        load_checkpoint(path, params2, wrong_opt)
    assert all(torch.equal(before[n], params2[n]) for n in params2)


def test_extra_tensors_round_trip(tmp_path):
    from deltakit.train.checkpoint import load_extra_tensors
    model, params, opt, sched = _setup()
    best = {"1.weight": torch.arange(8.0).reshape(2, 4)}
    path = save_checkpoint(tmp_path, params, opt, sched, step=2, extra_tensors={"best": best})
    assert torch.equal(load_extra_tensors(path, "best")["1.weight"], best["1.weight"])
    plain = save_checkpoint(tmp_path, params, step=3)
    with pytest.raises(DeltakitFileError, match=r"expected extra tensors 'best' in the checkpoint .*step-00000003"):
        load_extra_tensors(plain, "best")
    with pytest.raises(ValueError, match=r"other than trainable / optimizer / rng and without '/', "
                                         r"found \['a/b', 'rng'\]"):
        save_checkpoint(tmp_path, params, step=4, extra_tensors={"rng": best, "a/b": best, "ok": best})


def test_default_checkpoint_dir_is_a_visible_sibling(tmp_path):
    from deltakit.train.checkpoint import default_checkpoint_dir
    assert default_checkpoint_dir(tmp_path / "runs" / "ad") == tmp_path / "runs" / "ad.ckpt"
    assert default_checkpoint_dir(f"{tmp_path}/runs/ad/") == tmp_path / "runs" / "ad.ckpt"


def test_claim_checkpoint_dir_binds_one_run(tmp_path):
    from deltakit.train.checkpoint import claim_checkpoint_dir
    d = tmp_path / "ad.ckpt"
    run = {"lr": 1e-3, "data": [("train", "ab12")], "set": ["r=2"]}
    assert claim_checkpoint_dir(d, run) is None
    assert json.loads((d / "run.json").read_text()) == {"lr": 1e-3, "data": [["train", "ab12"]], "set": ["r=2"]}
    assert claim_checkpoint_dir(d, {**run, "lr": 1.0}) is None  # no checkpoint yet: rebinding loses nothing
    model, params, opt, sched = _setup()
    save_checkpoint(d, params, opt, sched, step=5)
    assert claim_checkpoint_dir(d, {**run, "lr": 1.0}).name == "step-00000005"  # the same run: resume
    with pytest.raises(ValueError, match=r"expected the checkpoints in .*ad\.ckpt to be from this run, found another "
                                         r"run's \(lr: 1\.0 then, 0\.001 now\); delete .*ad\.ckpt to start over$"):
        claim_checkpoint_dir(d, run)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    (other / ".x.123.tmp").write_text("")  # a killed atomic write's debris does not count
    with pytest.raises(ValueError, match=r"expected .*mine to be empty or a deltakit checkpoint directory, "
                                         r"found \['notes\.txt'\]"):
        claim_checkpoint_dir(other, run)
    assert (other / "notes.txt").read_text() == "keep" and not (other / "run.json").exists()
