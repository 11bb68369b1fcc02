"""deltakit search: help, one-line errors with a non-zero exit, the space listing, run + report."""
from __future__ import annotations

import pytest
import yaml

from deltakit.cli import main


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--storage", "--workers", "--report", "--budgets", "--backend", "--fail-running", "--show-space"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["search", "--ray-address", "auto", "x.yaml"], "deltakit search: error: --ray-address: expected --backend ray "
                                                     "with it, found --backend optuna"),
    (["search"], "deltakit search: error: expected a search YAML (deltakit search SPACE.yaml) or --report, "
                 "found neither"),
    (["search", "missing.yaml"], "deltakit search: error: expected a search YAML file, found nothing at missing.yaml"),
    (["search", "--workers", "0", "x.yaml"], "deltakit search: error: --workers: expected an integer >= 1, found 0"),
])
def test_errors_are_one_line_and_exit_1(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_a_bad_space_entry_is_one_line(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"task": "toy", "methods": {"lora": {"r": [0, 8]}}}))
    assert main(["search", str(f), "--show-space"]) == 1
    assert capsys.readouterr().err == ("deltakit search: error: space.methods.lora.r.low: expected a positive "
                                       "integer, found 0\n")


def test_show_space_prints_the_declared_ranges(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"task": "toy", "methods": ["lora"], "training": {"steps": [50, 400]}}))
    assert main(["search", str(f), "--show-space"]) == 0
    rows = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "lora.r | in [1, 64] log" in rows and "train.steps | in [50, 400]" in rows


def test_run_then_report(tmp_path, capsys):
    f = tmp_path / "toy.yaml"
    f.write_text(yaml.safe_dump({"task": "toy", "methods": ["lora"], "trials": 4, "sampler": "random"}))
    url = f"sqlite:///{tmp_path / 'toy.db'}"
    assert main(["search", str(f), "--storage", url]) == 0
    assert main(["search", "--report", "--storage", url, "--budgets", "10,1e9", "-o", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'rep' / 'best-10.yaml'}" in out and (tmp_path / "rep" / "front.png").is_file()
    assert main(["search", "--report", "--storage", url, "--budgets", "1%"]) == 1
    assert "--budgets: expected parameter counts (the study has no base model size), found '1%'" in \
        capsys.readouterr().err
