"""The one safetensors layer: byte-level agreement with the safetensors package, sharded
atomic writes, and one-line errors naming the file for every kind of damage."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.io import tensors as st
from deltakit.io.files import DeltakitFileError, load_tensors as old_path_load, save_tensors as old_path_save


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    out = {f"t_{name}": (x * 4).to(dt) for name, dt in st.DTYPES.items() if dt.is_floating_point}
    out |= {"t_I64": torch.arange(-3, 4), "t_I8": torch.tensor([-128, 0, 127], dtype=torch.int8),
            "t_U8": torch.tensor([0, 255], dtype=torch.uint8), "t_BOOL": torch.tensor([True, False, True]),
            "t_I32": torch.tensor([[1, -2]], dtype=torch.int32), "empty": torch.zeros(0, 4)}
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_save_tensors_writes_the_bytes_safetensors_writes(tmp_path):
    sd = _all_dtypes()
    assert {"BF16", "F8_E4M3", "F8_E5M2", "F16", "F64"} <= set(st.DTYPES)
    st.save_tensors(tmp_path / "ours.safetensors", sd, metadata={"format": "pt"})
    save_file(sd, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_load_tensors_reads_what_safetensors_writes_bit_for_bit(tmp_path):
    sd = _all_dtypes()
    save_file(sd, str(tmp_path / "lib.safetensors"))
    got = st.load_tensors(tmp_path / "lib.safetensors")
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and _bits(got[k]) == _bits(v), k
    assert old_path_load is st.load_tensors and old_path_save is st.save_tensors  # io.files re-exports


@pytest.mark.parametrize("shard_bytes", [1 << 30, 64])
def test_write_checkpoint_shards_with_an_hf_index(tmp_path, shard_bytes):
    sd = _all_dtypes()
    plan = [st.PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    out = st.write_checkpoint(tmp_path / "ck", plan, lambda it: sd[it.name], max_shard_bytes=shard_bytes,
                              metadata={"who": "test"}, fsync=False)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_bytes == 64:
        index = json.loads((out / st.INDEX_NAME).read_text())
        assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd.values())
    else:
        assert files == [st.SINGLE_NAME] and not (out / st.INDEX_NAME).exists()
    ck = st.LazyCheckpoint(out)
    assert ck.metadata == {"format": "pt", "who": "test"}
    lib = {}
    for f in files:
        lib |= load_file(str(out / f))  # the package agrees with what we wrote
    for k, v in sd.items():
        assert _bits(ck.get(k)) == _bits(lib[k]) == _bits(v), k
        assert _bits(ck.mapped(k)) == _bits(v) and ck.shape(k) == tuple(v.shape)


def test_failed_write_leaves_nothing(tmp_path):
    plan = [st.PlannedTensor("a", (2,), torch.float32), st.PlannedTensor("b", (2,), torch.float32)]

    def produce(it):
        if it.name == "b":
            raise RuntimeError("boom")
        return torch.ones(2)

    with pytest.raises(RuntimeError, match="boom"):
        st.write_checkpoint(tmp_path / "ck", plan, produce)
    assert list(tmp_path.iterdir()) == []


def _good(tmp_path):
    path = tmp_path / "x.safetensors"
    st.save_tensors(path, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    return path, path.read_bytes()


def _with_header(raw: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + raw[8 + n:]


def _set(name, **kw):
    return lambda h: {**h, name: {**h[name], **kw}}


@pytest.mark.parametrize("damage,expect", [
    (lambda raw: raw[:5], "expected an 8-byte header length, found a 5-byte file"),
    (lambda raw: raw[:40], "expected a header of at most 32 bytes, found a length of"),
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "expected a JSON header, found invalid JSON"),
    (lambda raw: raw[:-4], "tensor 'w': expected 24 bytes inside the file, found offsets 0..24"),
    (lambda raw: _with_header(raw, _set("w", data_offsets=[16, 40])), "found offsets 16..40"),
    (lambda raw: _with_header(raw, _set("w", dtype="F7")), "tensor 'w': expected a dtype in .* found 'F7'"),
    (lambda raw: _with_header(raw, _set("w", shape=[2, 4])), "tensor 'w': expected 32 bytes"),
    (lambda raw: _with_header(raw, lambda h: [1, 2]), "expected a JSON object header, found list"),
])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path, damage, expect):
    path, raw = _good(tmp_path)
    path.write_bytes(damage(raw))
    for read in (st.load_tensors, st.LazyCheckpoint, st.read_header):
        with pytest.raises(DeltakitFileError, match=expect) as e:
            read(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path} is not a readable safetensors file: ")


def test_missing_file_and_truncated_data_after_the_header_was_read(tmp_path):
    with pytest.raises(DeltakitFileError, match="expected a safetensors file at .*nope.safetensors, found nothing"):
        st.load_tensors(tmp_path / "nope.safetensors")
    path, raw = _good(tmp_path)
    ck = st.LazyCheckpoint(path)
    path.write_bytes(raw[:-8])  # truncated after the header was parsed
    with pytest.raises(DeltakitFileError, match=r"expected 24 bytes for 'w', found 16 \(truncated\?\)"):
        ck.get("w")
    with pytest.raises(DeltakitFileError, match="found a shorter file"):
        ck.mapped("w")


def test_load_tensors_handles_unaligned_data_and_never_writes_the_file(tmp_path):
    # plan order puts an f32 tensor 6 bytes into the data (after 3 bf16 values): not aligned
    sd = {"h": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), "w": torch.tensor([[0.5, -1.5]])}
    plan = [st.PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    out = st.write_checkpoint(tmp_path / "ck", plan, lambda it: sd[it.name], fsync=False)
    file = out / st.SINGLE_NAME
    assert st.read_header(file)[0]["w"].start % 4 == 2
    before = file.read_bytes()
    got = st.load_tensors(file)
    assert torch.equal(got["h"], sd["h"]) and torch.equal(got["w"], sd["w"])
    got["h"].fill_(7.0)
    got["w"].fill_(7.0)  # copy-on-write views / own memory: the file keeps its bytes
    assert file.read_bytes() == before and torch.equal(st.load_tensors(file)["h"], sd["h"])
