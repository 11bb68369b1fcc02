"""`deltakit train` as a user runs it: checked data, provenance in the manifest, loud divergence,
early stopping, and resuming after kill -9 to the bit-identical adapter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deltakit
from deltakit.cli import main
from deltakit.io.files import load_tensors, sha256_file


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from deltakit.train.data import write_tsv
    from deltakit.train.synthetic import make_task

    d = tmp_path_factory.mktemp("data")
    train, dev = make_task("sentiment", n_train=64, n_dev=32, seed=0)
    write_tsv(d / "train.tsv", train)
    write_tsv(d / "dev.tsv", dev)
    return d


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--train", str(data), "--set", "r=2", "--batch-size", "8",
            "--max-length", "16", "-o", str(out), *extra]


def test_manifest_records_metrics_data_and_settings(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ad"
    assert main(_argv(tiny_model_dir, data_dir, out, "--steps", "6", "--eval-every", "3", "--lr", "1e-3")) == 0
    printed = capsys.readouterr().out
    assert f"train {data_dir / 'train.tsv'}: 64 rows, labels {{0: 31, 1: 33}}, 0 empty texts" in printed
    assert f"dev   {data_dir / 'dev.tsv'}: 32 rows, labels {{0: 16, 1: 16}}, 0 empty texts" in printed
    assert printed.count("eval_accuracy=") == 2  # steps 3 and 6
    training = json.loads((out / "adapter.json").read_text())["training"]
    assert training["steps"] == 6
    assert set(training["metrics"]) == {"train_loss", "eval_accuracy", "eval_loss"}
    assert training["data"] == [
        {"split": "train", "path": str((data_dir / "train.tsv").resolve()), "rows": 64,
         "sha256": sha256_file(data_dir / "train.tsv")},
        {"split": "dev", "path": str((data_dir / "dev.tsv").resolve()), "rows": 32,
         "sha256": sha256_file(data_dir / "dev.tsv")}]
    assert training["settings"] | {"model": None} == {
        "model": None, "method": "lora", "set": ["r=2"], "lr": 1e-3, "steps": 6, "batch_size": 8,
        "max_length": 16, "max_rows": None, "metric": "accuracy", "seed": 0, "autocast": None, "num_labels": 2,
        "eval_every": 3, "early_stop": None}
    # the printed metrics are valid JSON and equal the manifest's (rounded)
    shown = json.loads(printed.strip().splitlines()[-1].split("  ", 1)[1])
    assert shown == {k: round(v, 4) for k, v in training["metrics"].items()}
    assert not (tmp_path / "ad.ckpt").exists()  # the default checkpoint directory is gone after the save


def test_divergence_exits_nonzero_saves_nothing_and_keeps_the_checkpoint(tiny_model_dir, data_dir, tmp_path,
                                                                        capsys):
    out = tmp_path / "ad"
    argv = _argv(tiny_model_dir, data_dir, out, "--steps", "20", "--lr", "1e30", "--ckpt-every", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' "Loading weights" bar
    ckpt = tmp_path / "ad.ckpt"
    assert err == (f"deltakit train: error: training diverged at step 2: the loss is nan; nothing was saved from "
                   f"it and the last good checkpoint {ckpt / 'step-00000001'} is kept (try a lower learning rate)")
    assert not out.exists()
    saved = load_tensors(ckpt / "step-00000001" / "trainable.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    # another learning rate is another run: its checkpoints are not silently mixed in
    assert main(argv[:-4] + ["--lr", "1e-3", "--ckpt-every", "1"]) == 1
    assert "found another run's (lr: 1e+30 then, 0.001 now); delete" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--num-labels", "3"], "expected 3 classes 0..2 in the training data (--num-labels 3), found 2: [0, 1]"),
    (["--early-stop", "2"], "--early-stop: expected --eval-every and dev data"),
    (["--eval-every", "0"], "--eval-every: expected an integer >= 1, found 0"),
])
def test_bad_settings_fail_before_training(tiny_model_dir, data_dir, tmp_path, capsys, extra, needle):
    assert main(_argv(tiny_model_dir, data_dir, tmp_path / "ad", *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err  # fails before the model is loaded
    assert not (tmp_path / "ad").exists() and not (tmp_path / "ad.ckpt").exists()


def test_single_class_and_unseen_dev_label_are_errors(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "one.tsv").write_text("sentence\tlabel\na\t1\nb\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na\t0\nb\t2\n")
    (tmp_path / "two.tsv").write_text("sentence\tlabel\na\t0\nb\t1\n")
    assert main(["train", "--model", str(tiny_model_dir), "--train", str(tmp_path / "one.tsv"), "-o",
                 str(tmp_path / "x")]) == 1
    assert "at least 2 classes in the training data, found only label [1]" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_model_dir), "--train", str(tmp_path / "two.tsv"), "--dev",
                 str(tmp_path / "dev.tsv"), "-o", str(tmp_path / "x")]) == 1
    assert "found [2] only in dev" in capsys.readouterr().err


def test_early_stop_saves_the_best_adapter(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ad"
    # lr 0.3 makes the dev loss wander; patience 1 stops at the first evaluation without improvement
    assert main(_argv(tiny_model_dir, data_dir, out, "--steps", "40", "--lr", "0.3", "--eval-every", "2",
                      "--early-stop", "1")) == 0
    printed = capsys.readouterr().out
    training = json.loads((out / "adapter.json").read_text())["training"]
    evals = [(int(line.split()[1][:-1]), float(line.split("eval_accuracy=")[1].split()[0]),
              float(line.split("eval_loss=")[1].split()[0]))
             for line in printed.splitlines() if line.startswith("step ") and "eval_accuracy=" in line]
    best_step, best, best_loss = max(evals, key=lambda e: (e[1], -e[0]))  # the first of the best
    assert training["steps"] == evals[-1][0] < 40 and training["best_step"] == best_step < training["steps"]
    assert round(training["metrics"]["eval_accuracy"], 4) == best
    assert round(training["metrics"]["eval_loss"], 4) == best_loss
    assert f"(best evaluation: step {best_step} of {training['steps']})" in printed
    # the saved parameters are that evaluation's, not the last one's: scoring the saved adapter gives its loss
    from transformers import AutoTokenizer, BertForSequenceClassification

    from deltakit.train import evaluate, make_loader, read_rows
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    deltakit.load_adapter(model, out)
    dev = make_loader(read_rows(data_dir / "dev.tsv"), AutoTokenizer.from_pretrained(tiny_model_dir), batch_size=64,
                      max_length=16)
    scored = evaluate(model, dev)
    assert abs(evals[-1][2] - best_loss) > 1e-3  # the last evaluation is distinguishable from the best
    assert scored["loss"] == pytest.approx(training["metrics"]["eval_loss"], rel=1e-6)
    assert scored["accuracy"] == training["metrics"]["eval_accuracy"]


def _env() -> dict[str, str]:
    src = str(Path(deltakit.__file__).resolve().parents[1])  # the deltakit under test, not an installed one
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


# methods whose training keeps state beside the parameters: rank budgets (AdaLoRA, IncreLoRA: masks
# and importance averages), LISA's block sampler (its RNG and active set)
KILL_CASES = {"lora": [], "adalora": ["--method", "adalora", "--set", "init_r=4", "--set", "target_r=2",
                                      "--set", "deltaT=2"],
              "lisa": ["--method", "lisa", "--set", "gamma=1", "--set", "period=3"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(KILL_CASES))
def test_kill_9_then_rerun_resumes_to_the_bit_identical_adapter(tiny_model_dir, data_dir, tmp_path, method):
    """A real `deltakit train` process is SIGKILLed after its step-8 checkpoint (dropout on, so the RNG
    state matters too); the same command run again resumes and saves exactly the uninterrupted adapter."""
    argv = _argv(tiny_model_dir, data_dir, "OUT", "--steps", "60", "--ckpt-every", "4", "--lr", "1e-3")
    if KILL_CASES[method]:  # another method: its own knobs instead of LoRA's r
        argv = [a for a in argv if a not in ("--set", "r=2")] + KILL_CASES[method]
    cmd = [sys.executable, "-m", "deltakit.cli"] + argv
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    out_at = cmd.index("OUT")

    def at(d):
        return [*cmd[:out_at], str(d / "ad"), *cmd[out_at + 1:]]

    ref = subprocess.run(at(ref_dir), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(at(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "ad.ckpt" / "step-00000008" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and marker.exists()
    assert not (run_dir / "ad").exists()  # killed mid-run: nothing saved yet

    again = subprocess.run(at(run_dir), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed_at = int(again.stderr.split("step-")[1][:8])
    assert "resuming from" in again.stderr and 8 <= resumed_at < 60
    a, b = load_tensors(ref_dir / "ad" / "adapter.safetensors"), load_tensors(run_dir / "ad" / "adapter.safetensors")
    assert set(a) == set(b) and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (run_dir / "ad.ckpt").exists()
