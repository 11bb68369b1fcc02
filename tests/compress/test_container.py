"""The compressed-delta file: the task-vector manifest plus compressor, knobs, dtype, bytes, sha256 and the
base fingerprint; lazy, atomic, and every defect a one-line error that changes nothing."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deltakit.io.tensors as iot
from deltakit import model_fingerprint
from deltakit.compress import compress_tensor
from deltakit.compress.container import (FORMAT, Source, checkpoint_fingerprint, load_compressed,
                                         write_compressed)
from deltakit.io.files import DeltakitFileError, output_kind
from deltakit.io.tensors import load_tensors, read_header, save_tensors
from deltakit.taskvec import LowRank, TaskVector


def _delta():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    return {"w": w, "b": torch.randn(40, generator=g).to(torch.bfloat16),
            "lr": LowRank(torch.randn(16, 2, generator=g), torch.randn(2, 8, generator=g), 0.5, (16, 8))}


def _write(path, **kw):
    d = _delta()
    v = compress_tensor(d["w"], "topk", density=0.25)
    entries = {"w": Source(v, "topk", {"density": 0.25, "value_dtype": "float16"}), "b": d["b"], "lr": d["lr"]}
    return write_compressed(path, entries, **kw), d, v


def _rewrite_manifest(path, edit):
    """Rewrite the file with ``edit(entries)`` applied to its manifest (a hand-edited file)."""
    f = path / "model.safetensors"
    tensors = {k: t.clone() for k, t in load_tensors(f).items()}
    _, meta = read_header(f)
    entries = json.loads(meta["entries"])
    edit(entries)
    save_tensors(f, tensors, {**meta, "entries": json.dumps(entries)})


def test_records_every_entry_and_round_trips(tmp_path):
    path, d, v = _write(tmp_path / "c", base_fingerprint="sample-v2:abc", base_exclude=["classifier"])
    f = load_compressed(path)
    w, b, lr = f.records["w"], f.records["b"], f.records["lr"]
    assert (w.codec, w.compressor, w.knobs, w.shape, w.dtype) == ("sparse", "topk", {"density": 0.25,
                                                                                       "value_dtype": "float16"},
                                                                  (40, 24), "float32")
    # bytes counted from what is stored: 240 fp16 values + the position index, as the file's tensors say
    assert w.bytes == v.nbytes == sum(iot.LazyCheckpoint(path).nbytes(k) for k in w.parts.values())
    assert w.bytes == 480 + v.tensors()["mask" if "mask" in v.tensors() else "unary"].nbytes + \
        sum(t.nbytes for k, t in v.tensors().items() if k == "rem")
    assert (b.codec, b.compressor, b.dtype, b.bytes, b.ratio) == ("dense", None, "bfloat16", 80, 1.0)
    assert (lr.codec, lr.bytes, lr.original_bytes) == ("lowrank", (32 + 16) * 4, 16 * 8 * 4)
    assert f.total_bytes == w.bytes + 80 + 192 and f.file_bytes > f.total_bytes
    assert f.header == {"format": FORMAT, "base_fingerprint": "sample-v2:abc", "base_exclude": ["classifier"]}
    tv = f.task_vector()
    assert torch.equal(tv["w"], v.to_dense()) and torch.equal(tv["b"], d["b"])
    assert torch.equal(tv["lr"], d["lr"].to_dense()) and tv.shape("lr") == (16, 8)
    assert output_kind(path) == "compressed"
    # the plain task-vector reader reads the same file (the extra fields are optional)
    plain = TaskVector.load(path)
    assert all(torch.equal(plain[n], tv[n]) for n in ("w", "b", "lr"))


def test_old_task_vector_files_load_without_records(tmp_path):
    d = _delta()
    TaskVector.from_mapping(d).save(tmp_path / "tv")
    f = load_compressed(tmp_path / "tv", verify=True)
    assert {n: (r.compressor, r.sha256) for n, r in f.records.items()} == {n: (None, None) for n in d}
    assert f.records["lr"].bytes == 192 and f.records["b"].bytes == 80 and f.base_fingerprint is None
    assert torch.equal(f.task_vector()["lr"], d["lr"].to_dense())


def test_reads_lazily_one_entry_at_a_time(tmp_path, monkeypatch):
    path, _, _ = _write(tmp_path / "c")
    reads = []
    real = iot.read_tensor
    monkeypatch.setattr(iot, "read_tensor", lambda info, *a, name="", **k: reads.append(name) or
                        real(info, *a, name=name, **k))
    tv = load_compressed(path).task_vector()
    assert reads == []                                   # opening reads headers only
    tv.get("lr")
    assert sorted(reads) == ["lr.lowrank_A", "lr.lowrank_B"]


def test_truncated_file_is_a_one_line_error(tmp_path):
    path, _, _ = _write(tmp_path / "c")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DeltakitFileError, match="truncated") as e:
        load_compressed(path)
    assert "\n" not in str(e.value)


def test_corrupted_entry_fails_its_sha256(tmp_path):
    path, _, _ = _write(tmp_path / "c")
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    info = iot.LazyCheckpoint(path).info("w.sparse_values")
    raw[info.start + 3] ^= 0x10                          # one bit of one kept value
    f.write_bytes(bytes(raw))
    c = load_compressed(path)                            # headers are fine: lazy open succeeds
    assert torch.equal(c.get("b"), _delta()["b"])        # the other entries still read
    with pytest.raises(DeltakitFileError, match="entry 'w' does not match its sha256"):
        c.get("w")
    with pytest.raises(DeltakitFileError, match="sha256"):
        load_compressed(path, verify=True)


def test_unknown_codec_and_bad_bytes_in_the_manifest(tmp_path):
    path, _, _ = _write(tmp_path / "c")
    _rewrite_manifest(path, lambda e: e["w"].update(codec="nosuchcodec"))
    with pytest.raises(DeltakitFileError, match="entry 'w'.*found 'nosuchcodec'") as e:
        load_compressed(path)
    assert "\n" not in str(e.value)
    path, _, _ = _write(tmp_path / "d")
    _rewrite_manifest(path, lambda e: e["b"].update(bytes=1))
    with pytest.raises(DeltakitFileError, match="entry 'b' expected 1 stored bytes"):
        load_compressed(path)


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    path.mkdir()
    save_tensors(path / "model.safetensors", {k: v.detach() for k, v in m.state_dict().items()})
    return m


def test_base_fingerprint_checked_against_a_checkpoint_or_model(tmp_path):
    model = _checkpoint(tmp_path / "base", 0)
    _checkpoint(tmp_path / "other", 1)
    fp = checkpoint_fingerprint(tmp_path / "base")
    assert fp == model_fingerprint(model)                # a checkpoint hashes as the model it holds
    path, _, _ = _write(tmp_path / "c", base_fingerprint=fp)
    assert load_compressed(path, base=tmp_path / "base").base_fingerprint == fp
    load_compressed(path, base=model)
    with pytest.raises(DeltakitFileError, match="base differs") as e:
        load_compressed(path, base=tmp_path / "other")
    assert "\n" not in str(e.value)
    # modules the delta replaces outright (modules_to_save) are left out of both sides
    path2, _, _ = _write(tmp_path / "c2", base_fingerprint=checkpoint_fingerprint(tmp_path / "base", exclude=["1"]),
                         base_exclude=["1"])
    with torch.no_grad():
        model[1].weight.add_(1.0)
    load_compressed(path2, base=model)
    with pytest.raises(DeltakitFileError, match="base differs"):
        load_compressed(path, base=model)


def test_failed_writes_change_nothing(tmp_path):
    path, _, v = _write(tmp_path / "c")
    before = (path / "model.safetensors").read_bytes()

    def boom():
        raise RuntimeError("encoder failed")
    with pytest.raises(RuntimeError, match="encoder failed"):
        write_compressed(path, {"a": torch.ones(3), "b": Source(boom)})
    with pytest.raises(DeltakitFileError, match="expected at most 10 bytes of encoded parts, found 12"):
        write_compressed(path, {"a": torch.ones(3)}, max_bytes=10)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]          # no temp debris either


def test_dense_entries_are_recomputed_not_held(tmp_path):
    calls = []

    def dense():
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)
    write_compressed(tmp_path / "c", {"d": Source(dense)})
    assert len(calls) == 2                               # planned, then produced when written
    assert torch.equal(load_compressed(tmp_path / "c", verify=True).get("d"), torch.arange(6.0).reshape(2, 3))
    flip = iter([torch.zeros(2), torch.ones(2)])
    with pytest.raises(DeltakitFileError, match="changed between planning and writing"):
        write_compressed(tmp_path / "e", {"d": Source(lambda: next(flip))})
    assert not (tmp_path / "e").exists()
