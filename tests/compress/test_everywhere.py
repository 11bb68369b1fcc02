"""Compressed deltas everywhere (issue 15, item 4): applied by streaming, attached for inference,
merged in the streaming executor, exported as a peft LoRA. Memory is checked by counting the
dense decodes alive at once (a decode's storage is tracked until torch frees it, views included)."""
from __future__ import annotations

import copy
import json
import math
import weakref
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltakit as dk
from deltakit.compress import compress_tensor
from deltakit.compress.apply import attach_compressed
from deltakit.compress.codecs.topk import Sparse
from deltakit.compress.export import export_lora, svd_factors
from deltakit.merge import merge_task_vectors
from deltakit.taskvec import DeltaValue, LowRank, TaskVector, as_dense, register_codec
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")


# ----------------------------------------------------------------------------- helpers
@register_codec("test_everywhere_int8")
class Int8(DeltaValue):
    """A test-local codec with no compact product: int8 codes times one scale (symmetric)."""

    def __init__(self, codes: torch.Tensor, scale: float):
        self.codes, self.scale = codes, float(scale)

    @classmethod
    def encode(cls, dw: torch.Tensor) -> Int8:
        scale = float(dw.abs().max()) / 127 or 1.0
        return cls(torch.round(dw / scale).to(torch.int8), scale)

    shape = property(lambda self: tuple(self.codes.shape))
    dtype = property(lambda self: torch.float32)

    def to_dense(self, dtype=None):
        return (self.codes.float() * self.scale).to(dtype or torch.float32)

    def tensors(self):
        return {"codes": self.codes}

    def meta(self):
        return {"scale": self.scale}

    @classmethod
    def from_tensors(cls, tensors, meta):
        return cls(tensors["codes"], meta["scale"])


class Decodes:
    """Counts ``to_dense`` calls of the patched codecs and the dense results alive at once
    (their storages, so a reshaped view keeps a decode alive as it keeps its memory)."""

    def __init__(self) -> None:
        self.calls = self.alive = self.peak = self.alive_bytes = self.peak_bytes = 0

    def _freed(self, nbytes: int) -> None:
        self.alive -= 1
        self.alive_bytes -= nbytes

    def wrap(self, fn):
        def to_dense(value, dtype=None):
            t = fn(value, dtype)
            st = t.untyped_storage()
            self.calls += 1
            self.alive += 1
            self.alive_bytes += st.nbytes()
            self.peak, self.peak_bytes = max(self.peak, self.alive), max(self.peak_bytes, self.alive_bytes)
            weakref.finalize(st, self._freed, st.nbytes())
            return t
        return to_dense


@pytest.fixture
def decodes(monkeypatch):
    d = Decodes()
    for cls in (Sparse, LowRank, Int8):
        monkeypatch.setattr(cls, "to_dense", d.wrap(cls.to_dense))
    return d


def _model(seed=0):
    torch.manual_seed(seed)
    return tiny_llama().eval()


def _ids(seed=5):
    return torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _compressed(model, seed=1, lowrank_scale=0.05) -> dict:
    """Every codec on tiny Llama: topk on q/up, LowRank on down, Int8 on v, dense on the norms."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        dw = torch.randn(p.shape, generator=g) * 0.1
        if n.endswith(("q_proj.weight", "up_proj.weight")):
            out[n] = compress_tensor(dw, "topk", density=0.25)
        elif n.endswith("down_proj.weight"):
            out[n] = LowRank(torch.randn(p.shape[0], 3, generator=g), torch.randn(3, p.shape[1], generator=g),
                             lowrank_scale)
        elif n.endswith("v_proj.weight"):
            out[n] = Int8.encode(dw)
        elif n.endswith("input_layernorm.weight"):
            out[n] = dw
    return out


def _dense(tv: TaskVector) -> TaskVector:
    return TaskVector.from_mapping({n: as_dense(tv.get(n)).clone() for n in tv.keys()})


def _largest_decode(values: Mapping) -> int:
    return max(as_dense(v).nbytes for v in values.values() if not isinstance(v, torch.Tensor))


def test_the_decode_counter_sees_held_decodes_and_views(decodes):
    values = [v for v in _compressed(_model()).values() if not isinstance(v, torch.Tensor)]
    held = [as_dense(v).reshape(-1) for v in values]  # the decoded objects die, their views hold the memory
    assert decodes.calls == decodes.peak == decodes.alive == 8
    assert decodes.alive_bytes == sum(h.nbytes for h in held)
    del held
    assert decodes.alive == decodes.alive_bytes == 0


# ----------------------------------------------------------------------------- (a) apply by streaming
def test_apply_to_a_model_decodes_one_entry_at_a_time(decodes):
    model, ref = _model(), _model()
    values = _compressed(model)
    tv = TaskVector.from_mapping(values)
    _dense(tv).apply(ref)
    largest = _largest_decode(values)
    decodes.calls = 0
    tv.apply(model)
    assert decodes.calls == 8  # 4 topk + 2 LowRank + 2 Int8 (the 2 dense norms are not decoded)
    assert decodes.peak == 1 and decodes.peak_bytes <= largest and decodes.alive == 0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_apply_to_a_checkpoint_streams_a_loaded_compressed_file(decodes, tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    values = _compressed(model)
    TaskVector.from_mapping(values).save(tmp_path / "tv")
    tv = TaskVector.load(tmp_path / "tv")
    decodes.calls = 0
    tv.apply_to_checkpoint(tmp_path / "base", tmp_path / "out")
    assert decodes.calls == 8 and decodes.peak == 1 and decodes.alive == 0
    assert decodes.peak_bytes <= _largest_decode(values)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = _dense(TaskVector.from_mapping(values)).apply(dict(model.state_dict()))
    assert all(torch.equal(got[n], want[n]) for n in values)
    assert set(got) == set(model.state_dict())


# ----------------------------------------------------------------------------- (b) attach for inference
def test_attached_compressed_equals_merged_with_one_decode_alive(decodes):
    model, merged = _model(), _model()
    values = _compressed(model)
    tv = TaskVector.from_mapping(values)
    _dense(tv).apply(merged)
    ad = attach_compressed(model, tv, name="c")
    kinds = {p: type(d).__name__ for p, d in ad.deltas()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "CompactDelta"      # Sparse
    assert kinds["model.layers.0.mlp.down_proj"] == "CompactDelta"         # LowRank
    assert kinds["model.layers.0.self_attn.v_proj"] == "CompressedDelta"   # Int8: decoded on use
    assert kinds["model.layers.0.input_layernorm"] == "CompressedDelta"    # dense
    assert ad.num_parameters() == 0
    ids = _ids()
    want = _logits(merged, ids)
    decodes.calls = 0
    got = _logits(model, ids)  # no autograd, 18 tokens: the core folds every dW into W per layer
    assert (got - want).abs().max().item() <= 1e-5
    assert decodes.calls == 8 and decodes.peak == 1 and decodes.alive == 0
    assert decodes.peak_bytes <= _largest_decode(values)


def test_compact_values_apply_without_forming_dw(decodes):
    model, merged = _model(), _model()
    tv = TaskVector.from_mapping(_compressed(model))
    _dense(tv).apply(merged)
    attach_compressed(model, tv, name="c")
    ids = _ids()
    decodes.calls = 0
    got = model(ids).logits  # autograd on: the factored / sparse residual path (never folded)
    assert decodes.calls == 2  # only the two Int8 values, which have no compact product
    assert (got.detach() - _logits(merged, ids)).abs().max().item() <= 1e-5


def test_attached_compressed_composes_with_disable_mixed_batches_merge_and_detach():
    model, merged = _model(), _model()
    base = _logits(model, _ids())
    tv = TaskVector.from_mapping(_compressed(model))
    _dense(tv).apply(merged)
    ids, want = _ids(), _logits(merged, _ids())
    ad = attach_compressed(model, tv, name="c")
    with dk.disabled(model):
        assert torch.equal(_logits(model, ids), base)
    with dk.mixed_batch(model, ["c", None, "c"]):
        mixed = _logits(model, ids)
    assert (mixed[[0, 2]] - want[[0, 2]]).abs().max().item() <= 1e-5
    assert (mixed[1] - base[1]).abs().max().item() <= 1e-5
    ad.merge()
    assert (_logits(model, ids) - want).abs().max().item() <= 1e-5
    ad.unmerge()
    dk.detach(model, "c")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(_logits(model, ids), base)


def test_attach_compressed_checks_names_and_shapes_before_touching_the_model():
    model = _model()
    with pytest.raises(KeyError, match="expected parameter 'model.layers.0.mlp.up_proj.bias'"):
        attach_compressed(model, TaskVector.from_mapping({"model.layers.0.mlp.up_proj.bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"expected a delta of shape \(16, 16\), found \(16, 8\)"):
        attach_compressed(model, TaskVector.from_mapping(
            {"model.layers.0.self_attn.q_proj.weight": LowRank(torch.ones(16, 1), torch.ones(1, 8))}))
    assert dk.adapters(model) == {}
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


# ----------------------------------------------------------------------------- (c) merge compressed files
def _two_files(tmp_path):
    model = _model()
    a = _compressed(model, seed=1)
    b = _compressed(model, seed=2, lowrank_scale=-0.03)
    TaskVector.from_mapping(a).save(tmp_path / "a")
    TaskVector.from_mapping(b).save(tmp_path / "b")
    return TaskVector.load(tmp_path / "a"), TaskVector.load(tmp_path / "b"), _largest_decode(a)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merging_compressed_files_equals_merging_their_decoded_values(method, tmp_path, decodes):
    a, b, largest = _two_files(tmp_path)
    want = merge_task_vectors(method, [_dense(a), _dense(b)])
    decodes.calls = 0
    got = merge_task_vectors(method, [a, b])
    names = got.keys()
    assert len(names) == 10
    for n in names:
        assert torch.equal(got[n], want[n]), n
    # every compressed entry decoded once per task vector, per name: (8 + 8) for 10 names
    assert decodes.calls == 16
    # bounded by one parameter: the K = 2 inputs of one name (the linear sum reads both at once)
    assert decodes.peak <= 2 and decodes.peak_bytes <= 2 * largest and decodes.alive == 0


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_checkpoints_streams_compressed_files_to_disk(method, tmp_path, decodes):
    from deltakit.merge import MergePlan, get_merge, merge_checkpoints

    a, b, largest = _two_files(tmp_path)
    want = merge_task_vectors(method, [_dense(a), _dense(b)])
    m = get_merge(method)
    decodes.calls = 0
    merge_checkpoints([a, b], tmp_path / "out", MergePlan(m, lambda n, layer, k: m.config()), progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == set(want.keys()) and all(torch.equal(got[n], want[n]) for n in got)
    # at most two names' inputs at once: the one merged and the one the prefetch thread reads
    assert decodes.peak <= 4 and decodes.peak_bytes <= 4 * largest and decodes.alive == 0


# ----------------------------------------------------------------------------- (d) export to a peft LoRA
def _random_adapter(model, config, seed=3):
    ad = dk.attach(model, config, name="src")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ad.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ad


CONFIGS = {
    "loha": lambda: dk.get_method("loha").config(r=2, targets=("q_proj", "up_proj", "down_proj")),
    "oft": lambda: dk.get_method("oft").config(block_size=4, targets=("k_proj", "o_proj")),
    "ia3": lambda: dk.get_method("ia3").config(targets=("v_proj", "down_proj")),
}


@pytest.mark.parametrize("method", ["loha", "oft", "ia3"])
def test_full_rank_lora_export_loads_in_peft_and_matches(method, tmp_path):
    model = _model()
    fresh = copy.deepcopy(model)
    ad = _random_adapter(model, CONFIGS[method]())
    ids = _ids()
    want = _logits(model, ids)
    with dk.disabled(model):
        assert (want - _logits(model, ids)).abs().max().item() > 1e-2  # the adapter is not a no-op
    report = export_lora(ad, model, tmp_path / "lora", rank=64)
    assert report.total_error < 1e-6 and all(f.rank == f.full_rank for f in report.layers.values())
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == report.r
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora").eval()
    assert (_logits(pm, ids) - want).abs().max().item() <= 1e-4
    assert list(dk.adapters(model)) == ["src"]  # the export's LoRA came off again


LAYOUTS = {  # model kind -> weights whose LoRA layouts differ (Conv1D and Embedding transposed, Conv2d kernels)
    "gpt2": ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"),
    "llama": ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"),
    "conv": ("conv1.weight", "conv2.weight", "head.weight"),
}


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_full_rank_export_of_every_lora_layout_matches_the_merged_model(kind, tmp_path):
    from tests.conftest import make_input, make_model, run

    model, merged = make_model(kind), make_model(kind)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(4)
    tv = TaskVector.from_mapping({n: torch.randn(params[n].shape, generator=g) * 0.2 for n in LAYOUTS[kind]})
    tv.apply(merged)
    x = make_input(kind)
    report = export_lora(tv, model, tmp_path / "lora", rank=1000)
    assert report.total_error < 1e-6
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "lora").eval()
    with torch.no_grad():
        got, want = run(pm, x), run(merged, x)
    assert (got - want).abs().max().item() <= 1e-4


def _peft_dw(path, report) -> dict[str, torch.Tensor]:
    """``(lora_alpha / r) B @ A`` per weight name from the written file."""
    t = load_file(path / "adapter_model.safetensors")
    s = json.loads((path / "adapter_config.json").read_text())["lora_alpha"] / report.r
    pre = "base_model.model."
    return {n: s * t[f"{pre}{n[:-7]}.lora_B.weight"] @ t[f"{pre}{n[:-7]}.lora_A.weight"] for n in report.layers}


def test_low_rank_export_reports_the_svd_tail_energy(tmp_path):
    model = _model()
    ad = _random_adapter(model, CONFIGS["loha"]())
    tv = TaskVector.from_adapter(ad)
    report = export_lora(ad, model, tmp_path / "lora", rank=2)
    assert report.r == 2 and report.padded == 0
    written = _peft_dw(tmp_path / "lora", report)
    tail = total = 0.0
    for n, fit in report.layers.items():
        dw = tv[n].double()
        s2 = torch.linalg.svdvals(dw).pow(2)
        want = math.sqrt(float(s2[2:].sum() / s2.sum()))
        assert fit.rank == 2 and fit.error == pytest.approx(want, rel=1e-5)
        measured = float(torch.linalg.vector_norm(dw - written[n].double()) / torch.linalg.vector_norm(dw))
        assert measured == pytest.approx(want, rel=1e-4)
        tail, total = tail + float(s2[2:].sum()), total + float(s2.sum())
    assert 0.1 < report.total_error == pytest.approx(math.sqrt(tail / total), rel=1e-5)


def test_energy_picks_the_smallest_rank_per_layer_and_pads_to_the_largest(tmp_path):
    model = _model()
    tv = TaskVector.from_mapping(_compressed(model))
    weights = tv.select(lambda n: n.endswith("proj.weight"))
    report = export_lora(weights, model, tmp_path / "lora", energy=0.8)
    ranks = set()
    for n, fit in report.layers.items():
        s2 = torch.linalg.svdvals(weights[n].double()).pow(2)
        kept = (s2.cumsum(0) / s2.sum()).tolist()
        assert kept[fit.rank - 1] >= 0.8 and (fit.rank == 1 or kept[fit.rank - 2] < 0.8), n
        ranks.add(fit.rank)
    assert report.layers["model.layers.0.mlp.down_proj.weight"].rank <= 3  # a rank-3 LowRank
    assert len(ranks) > 1 and report.r == max(ranks)
    assert report.padded == sum(report.r - f.rank for f in report.layers.values()) > 0
    written = _peft_dw(tmp_path / "lora", report)
    for n, fit in report.layers.items():
        err = torch.linalg.vector_norm(weights[n] - written[n]) / torch.linalg.vector_norm(weights[n])
        assert float(err) == pytest.approx(fit.error, rel=1e-3, abs=1e-6)


def test_svd_factors_hand_worked():
    dw = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # |dW|^2 = 14; rank 1 keeps 9, rank 2 keeps 13
    B, A, fit = svd_factors(dw, energy=0.9)
    assert fit.rank == 2 and fit.error == pytest.approx(math.sqrt(1 / 14))
    assert torch.allclose(B @ A, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
    assert svd_factors(dw, energy=9 / 14)[2].rank == 1
    assert svd_factors(dw, rank=5)[2].rank == 3 and svd_factors(dw, rank=5)[2].error == 0.0


def test_export_refuses_what_a_lora_cannot_hold(tmp_path):
    model = _model()
    tv = TaskVector.from_mapping({"model.layers.0.input_layernorm.weight": torch.ones(16)})
    with pytest.raises(ValueError, match="a LoRA holds the weight of a Linear.*found 'weight' of a LlamaRMSNorm"):
        export_lora(tv, model, tmp_path / "x", rank=2)
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        export_lora(tv, model, tmp_path / "x", rank=2, energy=0.5)
    with pytest.raises(ValueError, match=r"energy in \(0, 1\], found 1.5"):
        export_lora(tv, model, tmp_path / "x", energy=1.5)
    assert not (tmp_path / "x").exists() and dk.adapters(model) == {}


# ----------------------------------------------------------------------------- (d) the CLI
def test_cli_export_format_lora_writes_the_library_export_and_its_errors(tiny_model_dir, tmp_path, capsys):
    from transformers import BertForSequenceClassification

    from deltakit.cli import main

    torch.manual_seed(0)
    m = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    ad = _random_adapter(m, dk.get_method("loha").config(r=2, targets=("query", "value"),
                                                         modules_to_save=("classifier",)))
    path = dk.save_adapter(ad, tmp_path / "loha")
    want = export_lora(ad, m, tmp_path / "lib", energy=0.9)
    assert main(["export", str(path), "--format", "lora", "--energy", "0.9", "-o", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert f"LoRA r={want.r} ({want.padded} zero-padded rank components), total relative error " \
           f"{want.total_error:.4g}; left out (modules_to_save, not LoRA-shaped): classifier" in out
    row = next(r for r in want.rows() if r["tensor"] == "bert.encoder.layer.1.attention.self.value.weight")
    assert f"| {row['rank']} " in out and row["rel_error"] in out
    got = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    lib = load_file(tmp_path / "lib" / "adapter_model.safetensors")
    assert got.keys() == lib.keys() and all(torch.equal(got[k], lib[k]) for k in got)
    assert main(["export", str(path), "--format", "peft", "--rank", "2", "-o", str(tmp_path / "x")]) == 1
    assert "--rank / --energy go with --format lora" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
