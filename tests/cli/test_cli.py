"""The command line end to end on a tiny model directory (offline, seconds)."""
from __future__ import annotations

import json

import pytest
import torch

import deltakit as dk
from deltakit.cli import main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from deltakit.train.synthetic import make_task
    from deltakit.train.data import write_tsv

    d = tmp_path_factory.mktemp("data")
    train, dev = make_task("sentiment", n_train=64, n_dev=32, seed=0)
    write_tsv(d / "train.tsv", train)
    write_tsv(d / "dev.tsv", dev)
    return d


def test_every_command_has_help(capsys):
    for cmd in ["train", "inspect", "export", "merge", "methods", "demo", "bench"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: deltakit " + cmd in capsys.readouterr().out


def test_methods_lists_lora(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["kind"] == "weight" and "2106.09685" in lora["reference"]


def test_train_inspect_export_roundtrip(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "ad"
    assert main(["train", "--model", str(tiny_model_dir), "--train", str(data_file / "train.tsv"),
                 "--dev", str(data_file / "dev.tsv"), "--steps", "4", "--set", "r=2",
                 "--set", "targets=query,value", "--max-length", "32", "--autocast", "bf16", "-o", str(out)]) == 0
    assert (out / "adapter.safetensors").is_file()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lora (weight delta)" in text and "(ok)" in text and "BertForSequenceClassification" in text

    # merged export == base + adapter
    merged = tmp_path / "merged"
    assert main(["export", str(out), "-o", str(merged)]) == 0
    from transformers import BertForSequenceClassification
    x = torch.randint(100, 1000, (2, 7))
    ref = BertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    dk.load_adapter(ref, out)
    got = BertForSequenceClassification.from_pretrained(merged).eval()
    torch.testing.assert_close(got(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, dk.DeltaLayer) for m in got.modules())


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "/nonexistent/adapter"], "expected an adapter directory"),
    (["train", "--train", "/nonexistent.tsv", "-o", "/tmp/x"], "nonexistent.tsv"),
    (["train", "--train", "x.tsv", "--method", "nope", "-o", "/tmp/x"], "unknown method 'nope'"),
    (["train", "--train", "x.tsv", "--set", "r=abc", "-o", "/tmp/x"], "--set r: expected an integer, found 'abc'"),
    (["train", "--train", "x.tsv", "--set", "rank=4", "-o", "/tmp/x"], "has no field 'rank'"),
])
def test_errors_are_one_line_and_nonzero(argv, needle, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_corrupt_adapter_fails_inspect(tiny_model_dir, tmp_path, capsys):
    from transformers import BertForSequenceClassification
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    ad = dk.attach(m, dk.LoraConfig(r=2))
    dk.save_adapter(ad, tmp_path / "ad")
    f = tmp_path / "ad" / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["inspect", str(tmp_path / "ad")]) == 1
    assert "sha256 does not match" in capsys.readouterr().err


def _settings_for_tiny_bert(spec) -> list[str]:
    """``--set`` arguments for the fields a method's contract config changes for tiny models."""
    import dataclasses
    hook = getattr(spec.cls, "contract_config", None)
    cfg = hook("bert") if hook else None
    if cfg is None:
        return []
    default = spec.config()
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v != getattr(default, f.name) and v is not None:
            text = ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
            out += ["--set", f"{f.name}={text}"]
    return out


@pytest.mark.parametrize("method", sorted(dk.list_methods()))
def test_train_every_method_by_name(method, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / method
    argv = ["train", "--model", str(tiny_model_dir), "--train", str(data_file / "train.tsv"), "--method", method,
            "--steps", "3", "--batch-size", "8", "--max-length", "8", "-o", str(out),
            *_settings_for_tiny_bert(dk.get_method(method))]
    assert main(argv) == 0, method
    m = dk.load_adapter(__import__("transformers").BertForSequenceClassification.from_pretrained(tiny_model_dir), out)
    assert m.spec.name == method


def test_bench_passes_its_options_to_the_script(tmp_path, capsys):
    """`deltakit bench NAME ...` is `python bench/NAME.py ...`: the script's own options and
    help, and a real (tiny) merge benchmark against mergekit that writes its JSON."""
    pytest.importorskip("mergekit")
    with pytest.raises(SystemExit) as e:
        main(["bench", "merge", "--help"])
    assert e.value.code == 0 and "--repeats" in capsys.readouterr().out
    out = tmp_path / "speed.json"
    assert main(["bench", "merge", "--quick", "--dtypes", "fp32", "--methods", "linear",
                 "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["method"] == "linear" and row["diff_vs_mergekit"]["max_abs_diff"] == 0.0
    assert row["mergekit"]["wall_s"] > 0 and row["deltakit"]["peak_rss_mb"] > 0


@pytest.mark.parametrize("name,option", [("methods", "--budget-tasks"), ("merge-quality", "--report-from"),
                                         ("lora", "--dtypes"), ("llm", "--sections")])
def test_every_bench_script_loads_through_the_cli(capsys, name, option):
    """A script's frozen dataclasses (postponed annotations) need their module in sys.modules:
    `deltakit bench methods / merge-quality` failed at import before run_bench registered it."""
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0 and option in capsys.readouterr().out
