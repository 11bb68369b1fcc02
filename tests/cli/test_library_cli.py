"""``deltakit library``: add / list / show / remove / verify from the shell, on a tiny BERT saved
to disk (so the base is loaded the way a user's would be) and real LoRA adapters."""
from __future__ import annotations

import json

import pytest
import torch

import deltakit as dk
from deltakit.cli import main
from deltakit.io.files import sha256_file
from tests.library._helpers import lora_dir


@pytest.fixture(scope="module")
def base_and_adapters(tiny_model_dir, tmp_path_factory):
    """(base dir, {name: adapter dir}) with adapters trained on the base as load_base_for rebuilds it."""
    from transformers import BertForSequenceClassification

    from deltakit.io.models import load_pretrained

    d = tmp_path_factory.mktemp("adapters")
    model, _ = load_pretrained(BertForSequenceClassification, str(tiny_model_dir), seed=0, num_labels=2,
                               ignore_mismatched_sizes=True)
    dirs = {"sst2": lora_dir(d / "sst2", model, r=2, targets=["query", "value"], seed=1),
            "cola": lora_dir(d / "cola", model, r=4, targets=["key"], seed=2)}
    from deltakit.io.peft import export_peft
    adapter = dk.load_adapter(model, dirs["cola"], name="p")
    export_peft(adapter, d / "peft-cola")
    dk.detach(model, "p")
    cfg = json.loads((d / "peft-cola" / "adapter_config.json").read_text())
    cfg["task_type"] = "SEQ_CLS"  # as peft writes it for a classifier (the export cannot tell without a head)
    (d / "peft-cola" / "adapter_config.json").write_text(json.dumps(cfg))
    dirs["peft-cola"] = d / "peft-cola"
    torch.manual_seed(5)
    other = BertForSequenceClassification(model.config)  # another base of the same architecture
    other.config._name_or_path = None
    dirs["foreign"] = lora_dir(d / "foreign", other, r=2, targets=["query"], seed=3)
    return tiny_model_dir, dirs


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_add_list_show_remove_verify(tmp_path, base_and_adapters, capsys):
    base, dirs = base_and_adapters
    root = str(tmp_path / "lib")
    code, out, _ = _run(capsys, "library", "--root", root, "add", str(dirs["sst2"]), "--name", "sst2",
                        "--task", "sentiment", "--tag", "nlp", "--tag", "cls", "--group", "team-a")
    sha = sha256_file(dirs["sst2"] / "adapter.safetensors")
    assert code == 0 and out.strip() == f"added sst2@1 (lora, sha256 {sha[:12]}, 4 prototypes) to {root}"
    code, out, err = _run(capsys, "library", "--root", root, "add", str(dirs["peft-cola"]), "--model", str(base),
                        "--task", "grammar", "--parent", "sst2@1:merge", "--group", "team-b")
    assert code == 0 and out.startswith("added peft-cola@1 (lora,") and "2 prototypes" in out, err
    code, out, _ = _run(capsys, "library", "--root", root, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split(" | ")[0].strip() == "ref" and len(lines) == 4
    assert lines[2].startswith("peft-cola@1 | lora") and lines[3].startswith("sst2@1      | lora   | sentiment | cls,nlp")
    code, out, _ = _run(capsys, "library", "--root", root, "list", "--group", "team-b", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["ref"] for r in rows] == ["peft-cola@1"] and rows[0]["lineage"] == [{"parent": 1, "how": "merge"}]
    code, out, _ = _run(capsys, "library", "--root", root, "show", "sst2", "--json")
    shown = json.loads(out)
    assert shown["sha256"] == sha and shown["embedding"] == [64]
    assert shown["prototypes"] == {f"bert.encoder.layer.{i}.attention.self.{t}": [16]
                                   for i in (0, 1) for t in ("query", "value")}
    code, out, _ = _run(capsys, "library", "--root", root, "show", "sst2@1")
    assert code == 0 and "  bert.encoder.layer.0.attention.self.query: lora, [16]" in out.splitlines()
    code, out, _ = _run(capsys, "library", "--root", root, "remove", "peft-cola")
    assert code == 0 and out.startswith("removed peft-cola@1")
    code, out, _ = _run(capsys, "library", "--root", root, "verify")
    assert code == 0 and out.strip() == "ok: 1 entries checked"
    code, out, _ = _run(capsys, "library", "--root", root, "list", "--json")
    assert [r["ref"] for r in json.loads(out)] == ["sst2@1"]


def test_verify_fails_naming_a_corrupt_file(tmp_path, base_and_adapters, capsys):
    base, dirs = base_and_adapters
    root = str(tmp_path / "lib")
    assert _run(capsys, "library", "--root", root, "add", str(dirs["sst2"]))[0] == 0
    sha = sha256_file(dirs["sst2"] / "adapter.safetensors")
    f = tmp_path / "lib" / "objects" / sha / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    code, out, _ = _run(capsys, "library", "--root", root, "verify")
    assert code == 1
    assert out.splitlines() == [f"corrupt: sst2@1: {f}: sha256 does not match the index", "FAILED: 1 entries checked"]


def test_errors_are_one_line_with_a_non_zero_exit(tmp_path, base_and_adapters, capsys):
    base, dirs = base_and_adapters
    root = str(tmp_path / "lib")
    assert _run(capsys, "library", "--root", root, "add", str(dirs["sst2"]))[0] == 0
    code, out, err = _run(capsys, "library", "--root", root, "add", str(dirs["foreign"]), "--model", str(base))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("deltakit library: error: ") and "trained on another base than the model given" in err
    for argv, msg in ((["show", "nope"], "no library entry 'nope'"),
                      (["remove", "sst2@9"], "no library entry 'sst2@9' (versions: [1])"),
                      (["add", str(tmp_path / "missing")], "expected an adapter directory at"),
                      (["add", str(dirs["sst2"]), "--parent", "sst2@1"], "--parent: expected REF:HOW")):
        code, _, err = _run(capsys, "library", "--root", root, *argv)
        assert code == 1 and err.count("\n") == 1 and msg in err, (argv, err)
    code, _, err = _run(capsys, "library", "--root", str(tmp_path / "typo"), "list")
    assert code == 1 and "expected a library at" in err and not (tmp_path / "typo").exists()


@pytest.mark.parametrize("op", [None, "add", "list", "show", "remove", "verify"])
def test_help_everywhere(op, capsys):
    argv = ["library", "--root", "x"] + ([op] if op else []) + ["--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: deltakit library" in capsys.readouterr().out
