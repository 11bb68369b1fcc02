"""``deltakit library cluster``: MBC from the shell, on a tiny BERT saved to disk (the base is found
from the entries' manifests, as a user's would be) and LoRAs planted in two groups."""
from __future__ import annotations

import json

import pytest
import torch

import deltakit as dk
from deltakit.cli import main


def _planted(out, model, group: int, member: int):
    """r=2 LoRA on query/value: its group's factors plus 10% member noise."""
    ad = dk.attach(model, dk.LoraConfig(r=2, targets=["query", "value"]), name=out.name, activate=False)
    gc, gm = torch.Generator().manual_seed(100 + group), torch.Generator().manual_seed(200 + member)
    with torch.no_grad():
        for _, p in sorted(ad.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gc) + 0.1 * torch.randn(p.shape, generator=gm))
    dk.save_adapter(ad, out)
    dk.detach(model, out.name)
    return out


@pytest.fixture
def root(tiny_model_dir, tmp_path, capsys):
    """A library of x0, y0, x1, y1 (groups x and y)."""
    from transformers import BertForSequenceClassification

    from deltakit.io.models import load_pretrained

    model, _ = load_pretrained(BertForSequenceClassification, str(tiny_model_dir), seed=0, num_labels=2,
                               ignore_mismatched_sizes=True)
    root = str(tmp_path / "lib")
    for i, (name, group) in enumerate([("x0", 0), ("y0", 1), ("x1", 0), ("y1", 1)]):
        assert main(["library", "--root", root, "add", str(_planted(tmp_path / name, model, group, i))]) == 0
    capsys.readouterr()
    return root


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cluster_dry_run_then_add(root, capsys):
    code, out, err = _run(capsys, "library", "--root", root, "cluster", "--clusters", "2", "--dry-run")
    lines = out.splitlines()
    assert code == 0, err
    assert lines[0] == "4 entries in 2 clusters (cosine of dW, sketch, seed 0):"
    assert [c.strip() for c in lines[1].split(" | ")] == ["cluster", "size", "members", "cos within",
                                                         "cos between (nearest)"]
    assert [c.strip() for c in lines[3].split(" | ")][:3] == ["0", "2", "x0@1, x1@1"]
    assert [c.strip() for c in lines[4].split(" | ")][:3] == ["1", "2", "y0@1, y1@1"]
    within, between = float(lines[3].split(" | ")[3]), float(lines[3].split(" | ")[4].split()[0])
    assert within > 0.8 and abs(between) < 0.5 and lines[-1] == "dry run: nothing added"
    code, out, _ = _run(capsys, "library", "--root", root, "list", "--tag", "mbc")
    assert out.strip() == "no entries"

    code, out, err = _run(capsys, "library", "--root", root, "cluster", "--clusters", "2", "--exact")
    added = [ln for ln in out.splitlines() if ln.startswith("added")]
    assert code == 0 and "(cosine of dW, exact, seed 0)" in out, err
    assert added == ["added mbc-0@1 (rank 4, merged from 2: x0@1, x1@1)",
                     "added mbc-1@1 (rank 4, merged from 2: y0@1, y1@1)"]
    code, out, _ = _run(capsys, "library", "--root", root, "list", "--tag", "mbc", "--json")
    rows = json.loads(out)
    assert [r["ref"] for r in rows] == ["mbc-0@1", "mbc-1@1"] and {h["how"] for h in rows[0]["lineage"]} == {"merge"}
    code, out, _ = _run(capsys, "library", "--root", root, "verify")
    assert code == 0 and out.strip() == "ok: 6 entries checked"
    # a second run clusters the 4 task adapters again (not the MBC ones) and adds new versions
    code, out, _ = _run(capsys, "library", "--root", root, "cluster", "--clusters", "1", "--prefix", "all")
    assert code == 0 and out.splitlines()[-1] == "added all-0@1 (rank 8, merged from 4: x0@1, x1@1, y0@1, y1@1)"


def test_cluster_errors_are_one_line(root, tmp_path, capsys):
    code, _, err = _run(capsys, "library", "--root", root, "cluster", "--clusters", "5", "--dry-run")
    assert code == 1 and err == "deltakit library: error: --clusters: expected 1..4 (the entries to cluster), found 5\n"
    code, _, err = _run(capsys, "library", "--root", str(tmp_path / "none"), "cluster", "--clusters", "2")
    assert code == 1 and err.startswith("deltakit library: error: expected a library at") and err.count("\n") == 1
    code, _, err = _run(capsys, "library", "--root", root, "cluster", "--clusters", "2", "--rank", "0")
    assert code == 1 and err == "deltakit library: error: --rank: expected a positive integer, found 0\n"
    with pytest.raises(SystemExit) as e:
        main(["library", "--root", root, "cluster"])
    assert e.value.code == 2 and "--clusters" in capsys.readouterr().err


def test_cluster_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["library", "--root", "x", "cluster", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Model-based clustering (Ostapenko et al. 2024)" in out
    for flag in ("--clusters", "--seed", "--model", "--exact", "--method", "--rank", "--prefix", "--dry-run"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["library", "--help"])
    assert "cluster" in capsys.readouterr().out
