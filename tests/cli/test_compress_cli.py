"""deltakit compress / decompress / inspect of a compressed delta (in-process main(), tiny models, offline)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import deltakit as dk
from deltakit.cli import main
from deltakit.compress import _registry, compress_tensor, get_compressor
from deltakit.compress.container import checkpoint_fingerprint, load_compressed
from deltakit.core.fields import knob
from deltakit.io.tensors import LazyCheckpoint, save_tensors


@pytest.fixture
def pair(tmp_path):
    """A base checkpoint and a fine-tuned one (base + a small delta)."""
    g = torch.Generator().manual_seed(0)
    base = {"l1.weight": torch.randn(64, 32, generator=g), "l1.bias": torch.randn(64, generator=g),
            "l2.weight": torch.randn(32, 64, generator=g), "steps": torch.tensor([3])}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    for name, sd in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_tensors(tmp_path / name / "model.safetensors", sd)
    return tmp_path / "base", tmp_path / "ft", base, ft


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err      # one line, no traceback
    return err[0]


def test_list_shows_every_codec_with_knobs_and_planned_bits(capsys):
    assert main(["compress", "--list"]) == 0
    out = capsys.readouterr().out
    topk = get_compressor("topk")
    assert f"{topk.bits(topk.config(), (4096, 4096)):.3f} bits/param at the defaults (planned, 4096x4096)" in out
    # density 0.1: 16-bit values (1.6 bits/param) + Rice-coded geometric gaps with b = 2: per kept
    # entry b + 1 + E[floor(gap / 4)] = 3 + 0.9^4 / (1 - 0.9^4) = 4.9078 bits -> 1.6 + 0.4908
    assert "2.091 bits/param" in out
    assert "--density 0.1: fraction of entries kept" in out
    assert main(["compress", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["codec"] for r in rows} == {c.name for c in _registry.list_compressors()}


@dataclass(frozen=True)
class _HalfConfig:
    keep_rows: int = knob(1, ge=1, doc="rows kept (test)")


def test_a_newly_registered_codec_gets_its_flags_and_list_entry(pair, tmp_path, capsys):
    def enc(dw, cfg):
        """keep the first rows, dense (test)"""
        return compress_tensor(dw, "topk", density=1.0)
    _registry.register_compressor("test_rows", config=_HalfConfig)(enc)
    try:
        with pytest.raises(SystemExit):
            main(["compress", "--help"])
        assert "--keep-rows V" in capsys.readouterr().out
        assert main(["compress", "--list"]) == 0
        out = capsys.readouterr().out
        assert "test_rows: keep the first rows, dense (test)" in out and "(measured, 256x256)" in out
        base, ft, _, _ = pair
        assert main(["compress", str(ft), "--base", str(base), "--codec", "test_rows", "--keep-rows", "3",
                     "-o", str(tmp_path / "c"), "--no-progress"]) == 0
        rec = load_compressed(tmp_path / "c").records["l1.weight"]
        assert (rec.compressor, rec.knobs) == ("test_rows", {"keep_rows": 3})
    finally:
        _registry._COMPRESSORS.pop("test_rows")


def test_compress_a_checkpoint_pair_inspect_and_decompress(pair, tmp_path, capsys):
    base, ft, b, f = pair
    out = tmp_path / "c"
    assert main(["compress", str(ft), "--base", str(base), "--codec", "topk", "--density", "0.25", "-o", str(out),
                 "--no-progress"]) == 0
    c = load_compressed(out)
    assert c.base_fingerprint == checkpoint_fingerprint(base) and set(c.records) == {"l1.weight", "l1.bias",
                                                                                     "l2.weight"}
    want = {n: compress_tensor(f[n] - b[n], "topk", density=0.25) for n in c.records}
    assert {n: r.bytes for n, r in c.records.items()} == {n: v.nbytes for n, v in want.items()}
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    w = c.records["l1.weight"]
    assert f"l1.weight | topk(density=0.25, value_dtype=float16) | 64x32 | {round(w.bits_per_param, 3)}" in text
    assert f"{c.total_bytes:,} bytes encoded" in text and c.base_fingerprint in text
    assert main(["inspect", str(out), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["totals"]["bytes"] == c.total_bytes and js["totals"]["dense_bytes"] == (64 * 32 * 2 + 64) * 4
    # decompress: the dense task vector, and base + delta streamed into a checkpoint
    assert main(["decompress", str(out), "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    d = LazyCheckpoint(tmp_path / "d")
    assert all(torch.equal(d.get(n), want[n].to_dense()) for n in c.records)
    assert main(["decompress", str(out), "--apply-to", str(base), "-o", str(tmp_path / "m"), "--no-progress"]) == 0
    m = LazyCheckpoint(tmp_path / "m")
    assert all(torch.equal(m.get(n), b[n] + want[n].to_dense()) for n in c.records)
    assert torch.equal(m.get("steps"), b["steps"])
    # --overwrite replaces a deltakit output of the same kind only
    assert main(["decompress", str(out), "-o", str(tmp_path / "d"), "--no-progress"]) == 1
    assert "pass --overwrite" in _err(capsys)
    assert main(["decompress", str(out), "-o", str(tmp_path / "d"), "--no-progress", "--overwrite"]) == 0
    assert main(["decompress", str(out), "--apply-to", str(base), "-o", str(tmp_path / "d"), "--overwrite"]) == 1
    assert "expected a deltakit merged output" in _err(capsys)


def test_budget_mode_prints_the_allocation_and_meets_it(pair, tmp_path, capsys):
    base, ft, _, _ = pair
    assert main(["compress", str(ft), "--base", str(base), "--target-size", "3KB", "--codecs", "topk,keep",
                 "-o", str(tmp_path / "c"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    c = load_compressed(tmp_path / "c", verify=True)
    assert c.total_bytes <= 3000 and "budget 3,000 bytes, used" in out and "TOTAL" in out
    assert c.header["mode"] == "budget" and c.header["budget_bytes"] == 3000
    assert main(["compress", str(ft), "--base", str(base), "--ratio", "1000", "-o", str(tmp_path / "e"),
                 "--no-progress"]) == 1
    assert "expected a budget of at least" in _err(capsys) and not (tmp_path / "e").exists()


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    ad = dk.attach(m, dk.LoraConfig(r=2, targets=("query", "value"), modules_to_save=("classifier",)))
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return dk.save_adapter(ad, tmp_path / "ad"), ad


def test_compress_an_adapter_keeps_its_base_fingerprint(adapter_dir, tiny_model_dir, tmp_path, capsys):
    path, ad = adapter_dir
    man = json.loads((path / "adapter.json").read_text())
    assert main(["compress", str(path), "--codec", "topk", "--density", "0.5", "-o", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    c = load_compressed(tmp_path / "c")
    assert c.base_fingerprint == man["base_fingerprint"] and c.header["base_exclude"] == ["classifier"]
    tv = dk.TaskVector.from_adapter(ad)
    assert set(c.records) == set(tv.keys())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(c.get(name).to_dense(), compress_tensor(tv[name], "topk", density=0.5).to_dense())
    # the tiny base checkpoint is the adapter's base: applying is allowed; another base is refused
    assert main(["decompress", str(tmp_path / "c"), "--apply-to", str(tiny_model_dir), "-o", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    assert main(["decompress", str(tmp_path / "c"), "--apply-to", str(tmp_path / "c"), "-o",
                 str(tmp_path / "m2")]) == 1
    assert "base differs from the one the delta was made against" in _err(capsys)
    assert not (tmp_path / "m2").exists()


def test_defects_are_one_line_errors_that_change_nothing(pair, tmp_path, capsys):
    base, ft, _, _ = pair
    out = tmp_path / "c"
    assert main(["compress", str(ft), "--base", str(base), "--codec", "topk", "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    for argv, needle in [
        (["compress", str(ft), "--base", str(base), "--codec", "nope", "-o", str(tmp_path / "x")],
         "expected a compressor"),
        (["compress", str(ft), "--base", str(base), "--codec", "topk", "--density", "2", "-o", str(tmp_path / "x")],
         "TopKConfig.density: expected a number in (0, 1], found 2.0"),
        (["compress", str(ft), "--base", str(base), "--codec", "topk", "--ratio", "4", "-o", str(tmp_path / "x")],
         "expected exactly one of --codec, --target-size and --ratio"),
        (["compress", str(ft), "-o", str(tmp_path / "x")], "expected exactly one of"),
        (["compress", str(ft), "--codec", "topk", "-o", str(tmp_path / "x")], "with --base BASE"),
        (["compress", str(ft), "--base", str(base), "--codec", "topk", "-o", str(ft)], "it is the input"),
        (["compress", str(ft), "--base", str(base), "--codec", "topk", "-o", str(out)], "pass --overwrite"),
        (["decompress", str(out), "--apply-to", str(ft), "-o", str(tmp_path / "x")], "base differs"),
    ]:
        assert main(argv) == 1, argv
        assert needle in _err(capsys), argv
    assert not (tmp_path / "x").exists()
    # a truncated file: inspect and decompress refuse in one line, the output is not created
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    assert main(["inspect", str(out)]) == 1
    assert "truncated" in _err(capsys)
    assert main(["decompress", str(out), "-o", str(tmp_path / "x")]) == 1
    assert "truncated" in _err(capsys) and not (tmp_path / "x").exists()


def test_budget_weighted_by_activations_on_data(adapter_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from deltakit.compress.api import open_delta
    from deltakit.compress.budget import activation_stats, plan_budget
    from deltakit.train.data import make_loader

    path, _ = adapter_dir
    data = tmp_path / "d.tsv"
    data.write_text("sentence\n" + "".join(f"{t}\n" for t in ["a good film", "dull and slow", "not good at all"]))
    assert main(["compress", str(path), "--ratio", "8", "--codecs", "topk,keep", "--data", str(data),
                 "-o", str(tmp_path / "c"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "activation statistics: 14 linear layers, 3 rows" in out      # 2 layers x 6 linears + pooler + head
    c = load_compressed(tmp_path / "c")
    assert c.header["weighted"] is True
    # the same choices as the library's allocation with the same statistics
    d = open_delta(path)
    tok = AutoTokenizer.from_pretrained(d.model_path)
    d.model.eval()
    rows = [{"sentence": t, "label": 0} for t in ["a good film", "dull and slow", "not good at all"]]
    stats = activation_stats(d.model, ({k: v for k, v in b.items() if k != "labels"}
                                       for b in make_loader(rows, tok, batch_size=1)))
    want = plan_budget(d.tv, ratio=8, codecs=["topk", "keep"], stats=stats)
    assert {n: r.bytes for n, r in c.records.items()} == {n: ch.bytes for n, ch in want.choices.items()}
    assert c.total_bytes == want.total_bytes <= want.budget
