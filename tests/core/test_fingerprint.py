"""The base check covers the whole base (issue: nothing lost, item 6)."""
from __future__ import annotations

import json

import pytest
import torch

import deltakit as dk
from deltakit.core.fingerprint import SAMPLE, model_fingerprint, targets_fingerprint
from tests.conftest import make_model


def _saved(tmp_path, **kw):
    m = make_model("bert")
    ad = dk.attach(m, dk.LoraConfig(r=2, targets=("query", "value"), modules_to_save=("classifier",)))
    dk.save_adapter(ad, tmp_path / "ad", **kw)
    return tmp_path / "ad"


def _edit(model, name, fn):
    with torch.no_grad():
        fn(dict(model.named_parameters())[name])


def test_an_untargeted_ffn_or_embedding_that_differs_is_refused(tmp_path):
    path = _saved(tmp_path)
    for name in ("bert.encoder.layer.1.intermediate.dense.weight", "bert.embeddings.word_embeddings.weight"):
        other = make_model("bert")
        _edit(other, name, lambda p: p.mul_(1.01))
        with pytest.raises(dk.AdapterLoadError, match="--no-strict-base"):
            dk.load_adapter(other, path)
        assert not dk.adapters(other)
        dk.load_adapter(other, path, strict_base=False)


def test_the_replaced_head_does_not_count(tmp_path):
    path = _saved(tmp_path)
    other = make_model("bert")
    _edit(other, "classifier.weight", lambda p: p.normal_())  # modules_to_save replaces it outright
    dk.load_adapter(other, path)


def test_sample_sees_a_dense_change_full_sees_one_element():
    m = make_model("bert")
    sample, full = model_fingerprint(m), model_fingerprint(m, full=True)
    assert sample.startswith("sample-v2:") and full.startswith("full-v2:")
    w = dict(m.named_parameters())["bert.encoder.layer.0.output.dense.weight"]
    assert w.numel() < SAMPLE  # tiny tensors are hashed whole even in sample mode
    with torch.no_grad():
        w[3, 5] += 1e-3
    assert model_fingerprint(m) != sample and model_fingerprint(m, full=True) != full


def test_sample_mode_reads_a_bounded_sample_of_big_tensors():
    big = torch.nn.Linear(1024, 1024)
    fp = model_fingerprint(big)
    with torch.no_grad():
        big.weight[0, 1] += 1.0        # position 1 is not among the evenly spaced samples
    assert model_fingerprint(big) == fp
    assert model_fingerprint(big, full=True) != model_fingerprint(torch.nn.Linear(1024, 1024), full=True)


def test_full_fingerprint_is_recorded_and_checked(tmp_path):
    path = _saved(tmp_path, full_fingerprint=True)
    man = json.loads((path / "adapter.json").read_text())
    assert man["base_fingerprint"].startswith("full-v2:")
    dk.load_adapter(make_model("bert"), path)


def test_fingerprint_ignores_attached_and_merged_adapters():
    m = make_model("bert")
    before = model_fingerprint(m, full=True)
    ad = dk.attach(m, dk.LoraConfig(r=2))
    with torch.no_grad():
        for _, p in ad.named_parameters():
            p.normal_()
    ad.merge()
    assert model_fingerprint(m, full=True) == before


def test_version_1_files_are_still_checked_on_their_targets(tmp_path):
    path = _saved(tmp_path)
    man = json.loads((path / "adapter.json").read_text())
    m = make_model("bert")
    targets = [p for p, t in man["targets"].items() if t["method"] != "full"]
    man.update(format_version=1, base_fingerprint=targets_fingerprint(m, targets))
    (path / "adapter.json").write_text(json.dumps(man))
    dk.load_adapter(m, path)
    other = make_model("bert")
    _edit(other, "bert.encoder.layer.0.attention.self.query.weight", lambda p: p.add_(1))
    with pytest.raises(dk.AdapterLoadError, match="fingerprint"):
        dk.load_adapter(other, path)


def test_another_architecture_is_named_as_such(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(dk.AdapterLoadError, match="trained on a bert .*this model is a gpt2.*different architecture"):
        dk.load_adapter(make_model("gpt2"), path)


def test_manifest_missing_a_key_is_one_line(tmp_path):
    path = _saved(tmp_path)
    man = json.loads((path / "adapter.json").read_text())
    del man["tensors"]
    (path / "adapter.json").write_text(json.dumps(man))
    with pytest.raises(dk.DeltakitFileError, match=r"expected key 'tensors' \(dict\), found nothing"):
        dk.load_adapter(make_model("bert"), path)
