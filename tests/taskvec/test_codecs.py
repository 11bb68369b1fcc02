"""Delta values are an open protocol: a codec defined here, outside the library, travels
through TaskVector arithmetic, save, lazy load, apply and merge without library changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltakit.io import tensors as st
from deltakit.io.files import DeltakitFileError
from deltakit.taskvec import DeltaValue, LazyCheckpoint, LowRank, TaskVector, as_dense, codec_of, register_codec

DATA = Path(__file__).resolve().parents[1] / "data"


@register_codec("test_scaled_sign")
class ScaledSign(DeltaValue):
    """``dW = scale * sign``: one int8 per element plus one float (TIES-style sign + scale)."""

    def __init__(self, sign: torch.Tensor, scale: float) -> None:
        self.sign, self.scale_ = sign.to(torch.int8), float(scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.sign.shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.sign.to(torch.float32) * self.scale_).to(dtype or torch.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sign": self.sign}

    def meta(self) -> dict:
        return {"scale": self.scale_}

    @classmethod
    def from_tensors(cls, tensors, meta) -> ScaledSign:
        return cls(tensors["sign"], meta["scale"])


def _tv() -> TaskVector:
    return TaskVector.from_mapping({
        "a.weight": ScaledSign(torch.tensor([[1, -1, 0], [0, 1, 1]]), 0.25),
        "b.weight": LowRank(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, -1.0]]), 0.5),
        "b.bias": torch.tensor([0.5, -0.5]),
    })


def test_new_codec_saves_loads_lazily_and_applies(tmp_path, monkeypatch):
    tv = _tv()
    out = tv.save(tmp_path / "tv")
    manifest = json.loads(LazyCheckpoint(out).metadata["entries"])
    assert {n: e["codec"] for n, e in manifest.items()} == {
        "a.weight": "test_scaled_sign", "b.weight": "lowrank", "b.bias": "dense"}
    ck = LazyCheckpoint(out)
    assert ck.dtype("a.weight.test_scaled_sign_sign") == torch.int8  # stored compact, not dense
    assert sorted(ck.keys()) == ["a.weight.test_scaled_sign_sign", "b.bias", "b.weight.lowrank_A",
                                 "b.weight.lowrank_B"]

    reads: list[str] = []
    real = st.read_tensor
    monkeypatch.setattr(st, "read_tensor", lambda info, *a, **k: reads.append(k.get("name")) or real(info, *a, **k))
    back = TaskVector.load(out)
    assert reads == [] and back.shape("a.weight") == (2, 3)      # lazy: headers only
    v = back.get("a.weight")
    assert reads == ["a.weight.test_scaled_sign_sign"]
    assert isinstance(v, ScaledSign) and v.scale_ == 0.25 and codec_of(v) == "test_scaled_sign"
    assert isinstance(back.get("b.weight"), LowRank)

    base = {"a.weight": torch.ones(2, 3), "b.weight": torch.zeros(2, 3), "b.bias": torch.zeros(2)}
    got = back.apply(base, scale=2.0)
    assert torch.equal(got["a.weight"], torch.tensor([[1.5, 0.5, 1.0], [1.0, 1.5, 1.5]]))
    assert torch.equal(got["b.weight"], torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]]))
    assert torch.equal(got["b.bias"], torch.tensor([1.0, -1.0]))


def test_arithmetic_and_merge_read_unknown_codecs_through_to_dense():
    from deltakit.merge import build_config, merge_task_vectors

    tv = _tv()
    a = torch.tensor([[0.25, -0.25, 0.0], [0.0, 0.25, 0.25]])
    assert torch.equal((3 * tv)["a.weight"], 3 * a)                # scaled densely by default
    assert torch.equal((tv + tv)["a.weight"], 2 * a)
    assert torch.equal((tv - 0.5 * tv)["a.weight"], 0.5 * a)
    assert isinstance((tv + tv).get("b.weight"), LowRank)          # LowRank stays factored
    assert tv.norms()["a.weight"] == pytest.approx(0.5)            # sqrt(4 * 0.25^2)
    mixed = TaskVector.from_mapping({"a.weight": torch.ones(2, 3)}) + tv
    assert torch.equal(mixed["a.weight"], 1 + a)
    merged = merge_task_vectors("linear", [tv, 3 * tv], build_config("linear", {}))
    assert torch.allclose(merged["a.weight"], 2 * a)


def test_save_dtype_casts_floating_parts_only(tmp_path):
    out = _tv().save(tmp_path / "tv", dtype=torch.bfloat16)
    ck = LazyCheckpoint(out)
    assert ck.dtype("a.weight.test_scaled_sign_sign") == torch.int8
    assert ck.dtype("b.weight.lowrank_B") == ck.dtype("b.bias") == torch.bfloat16


def test_dense_entries_keep_their_dtype_when_saved(tmp_path):
    tv = TaskVector.from_mapping({"h": torch.tensor([1.5, -2.0], dtype=torch.float16),
                                  "d": torch.tensor([1 / 3], dtype=torch.float64)})
    back = TaskVector.load(tv.save(tmp_path / "tv"))
    assert back.get("h").dtype == torch.float16 and torch.equal(back["h"], tv["h"])
    assert back.get("d").dtype == torch.float64 and torch.equal(back["d"], tv["d"])


def test_version_1_files_still_load():
    """tests/data/taskvector_v1 was written by the code before the codec manifest (format 1)."""
    path = DATA / "taskvector_v1"
    assert LazyCheckpoint(path).metadata["deltakit"] == "deltakit.taskvector/1"
    expected = json.loads((path / "expected_dense.json").read_text())
    tv = TaskVector.load(path)
    assert sorted(tv.keys()) == sorted(expected)
    q, conv = tv.get("layer.0.query.weight"), tv.get("conv.weight")
    assert isinstance(q, LowRank) and q.scale == 0.5 and q.shape == (4, 3)
    assert isinstance(conv, LowRank) and conv.scale == 2.0 and conv.shape == (2, 2, 2, 2)
    for n, want in expected.items():
        assert torch.equal(as_dense(tv.get(n), torch.float32), torch.tensor(want, dtype=torch.float32)), n


def test_codec_registration_errors_and_unknown_codec_in_a_file(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_codec("test_scaled_sign")(type("Other", (ScaledSign,), {}))
    with pytest.raises(ValueError, match="other than 'dense'"):
        register_codec("dense")
    with pytest.raises(TypeError, match="expected a DeltaValue subclass"):
        register_codec("test_not_a_value")(dict)
    out = _tv().save(tmp_path / "tv")
    ck = LazyCheckpoint(out)
    entries = ck.metadata["entries"].replace("test_scaled_sign\"", "test_never_registered\"")
    tensors = {k: ck.get(k) for k in ck.keys()}
    st.save_tensors(out / "model.safetensors", tensors,
                    metadata={"deltakit": "deltakit.taskvector/2", "entries": entries})
    with pytest.raises(DeltakitFileError, match="entry 'a.weight': expected a registered codec .* "
                                                "found 'test_never_registered'"):
        TaskVector.load(out)
