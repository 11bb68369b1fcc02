"""Targeting rules and bad input: clear errors, nothing changed."""
import json

import pytest
import torch
from torch import nn

import deltakit as dk
from deltakit.core.targets import layer_index


def test_select_by_suffix_regex_type_and_layer(model_factory):
    m = model_factory("llama")
    got = dk.select_targets(m, ["q_proj"], layers=[1])
    assert got == ["model.layers.1.self_attn.q_proj"]
    got = dk.select_targets(m, [r"re:model\.layers\.0\.mlp\..*"], types=["Linear"])
    assert got == [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_index("lm_head") is None


def test_pattern_matching_nothing_is_an_error(model_factory):
    m = model_factory("bert")
    with pytest.raises(dk.TargetError, match="qury"):
        dk.attach(m, dk.LoraConfig(targets=["qury"]))
    assert not dk.adapters(m)


def test_unsupported_module_type_is_an_error_and_model_unchanged(model_factory):
    m = model_factory("bert")
    before = [n for n, _ in m.named_modules()]
    with pytest.raises(dk.TargetError, match="LayerNorm"):
        dk.attach(m, dk.LoraConfig(targets=["query", "attention.output.LayerNorm"]))
    assert [n for n, _ in m.named_modules()] == before
    assert all(p.requires_grad for p in m.parameters())


def test_no_default_for_unknown_family():
    with pytest.raises(dk.TargetError, match="no default targets"):
        dk.attach(nn.Sequential(nn.Linear(2, 2)), dk.LoraConfig())


def test_bad_config_values():
    with pytest.raises(dk.ConfigError, match="r: expected a positive integer, found 0"):
        dk.LoraConfig(r=0)
    with pytest.raises(dk.ConfigError, match="init: expected one of"):
        dk.LoraConfig(init="xavier")


def test_duplicate_method_name_is_an_error():
    from deltakit.core.registry import register_method
    from deltakit.methods.lora import LoRA

    @__import__("dataclasses").dataclass(frozen=True)
    class OtherConfig(dk.DeltaConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("lora", OtherConfig, paper="x", description="y")(LoRA)


def _saved(model_factory, tmp_path):
    m = model_factory("bert")
    ad = dk.attach(m, dk.LoraConfig(r=2))
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    dk.save_adapter(ad, tmp_path / "ad")
    return tmp_path / "ad"


def _unchanged_after_failed_load(model_factory, path, match, **kw):
    fresh = model_factory("bert")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises((dk.AdapterLoadError, dk.DeltakitFileError), match=match):
        dk.load_adapter(fresh, path, **kw)
    assert not dk.adapters(fresh)
    assert {k: v for k, v in fresh.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_corrupt_tensor_file(model_factory, tmp_path):
    path = _saved(model_factory, tmp_path)
    f = path / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    _unchanged_after_failed_load(model_factory, path, "sha256")


def test_truncated_tensor_file(model_factory, tmp_path):
    path = _saved(model_factory, tmp_path)
    f = path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    man = json.loads((path / "adapter.json").read_text())
    from deltakit.io.files import sha256_file
    man["tensors"]["sha256"] = sha256_file(f)          # checksum agrees: the parser must object
    (path / "adapter.json").write_text(json.dumps(man))
    _unchanged_after_failed_load(model_factory, path, "not a readable safetensors file")


def test_base_fingerprint_and_shape_mismatch(model_factory, tmp_path):
    path = _saved(model_factory, tmp_path)
    other = model_factory("bert", seed=5)                # same shapes, other weights
    with pytest.raises(dk.AdapterLoadError, match="fingerprint"):
        dk.load_adapter(other, path)
    dk.load_adapter(other, path, strict_base=False)      # allowed when asked for
    from transformers import BertConfig, BertForSequenceClassification
    wide = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))
    with pytest.raises(dk.AdapterLoadError, match=r"query.bias: adapter expects shape \[16\], model has \[32\]"):
        dk.load_adapter(wide, path)


def test_missing_directory_and_manifest(tmp_path, model_factory):
    with pytest.raises(dk.DeltakitFileError, match="found nothing"):
        dk.load_adapter(model_factory("bert"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dk.DeltakitFileError, match="adapter.json"):
        dk.load_adapter(model_factory("bert"), tmp_path / "empty")


def test_atomic_save_keeps_old_directory_on_failure(model_factory, tmp_path, monkeypatch):
    path = _saved(model_factory, tmp_path)
    old = (path / "adapter.json").read_text()
    m = model_factory("bert")
    ad = dk.attach(m, dk.LoraConfig(r=3))
    import deltakit.io.adapter_files as af

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(af, "write_json", boom)
    with pytest.raises(OSError):
        dk.save_adapter(ad, path)
    assert (path / "adapter.json").read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_merged_adapter_blocks_disabled_forward(model_factory):
    m = model_factory("bert")
    ad = dk.attach(m, dk.LoraConfig(r=2))
    ad.merge()
    with pytest.raises(dk.DeltaStateError, match="merged"):
        with dk.disabled(m):
            m(torch.randint(0, 64, (1, 4)))
    with pytest.raises(dk.DeltaStateError, match="already merged"):
        ad.merge()


def test_merge_and_detach_gives_plain_model(model_factory):
    m = model_factory("gpt2")
    x = torch.randint(0, 64, (2, 5))
    ad = dk.attach(m, dk.LoraConfig(r=2))
    for p in ad.parameters():
        torch.nn.init.normal_(p, std=0.1)
    y = m(x).logits
    dk.merge_and_detach(m)
    assert not any(isinstance(mod, dk.DeltaLayer) for mod in m.modules())
    torch.testing.assert_close(m(x).logits, y, rtol=1e-4, atol=1e-4)
    assert "transformer.h.0.attn.c_attn.weight" in m.state_dict()


def test_tied_weights_are_refused(model_factory):
    m = model_factory("gpt2")                           # lm_head.weight is wte.weight
    with pytest.raises(dk.TargetError, match="tied to transformer.wte"):
        dk.attach(m, dk.LoraConfig(targets=["lm_head"]))
    assert not dk.adapters(m)


def test_shared_parameters_work_in_sequential():
    from deltakit.core.registry import methods
    shared_methods = [n for n in ("tied_lora", "vera", "intrinsic") if n in methods()]
    for name in shared_methods:
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        x = torch.randn(2, 8)
        ad = dk.attach(m, methods()[name].config(targets=["0", "2"]), name="s")
        assert ad.shared is not None
        m(x)                                            # Sequential must not call the shared module
        names = [n for n, _ in ad.named_parameters()]
        if any(True for _ in ad.shared.parameters()):
            assert any(n.startswith("deltakit_shared.") for n in names), (name, names)
        dk.detach(m, "s")
        assert [type(c).__name__ for c in m] == ["Linear", "ReLU", "Linear"]


def test_mixed_batch_broadcasts_shared_rows(model_factory):
    m = model_factory("gpt2")                           # wpe sees position ids of shape (1, T)
    x = torch.randint(3, 64, (3, 5))
    a = dk.attach(m, dk.LoraConfig(r=2, targets=["wpe"]), name="a")
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ya = m(x).logits
    with dk.disabled(m):
        y0 = m(x).logits
    with dk.mixed_batch(m, ["a", None, "a"]):
        ym = m(x).logits
    for i, ref in enumerate([ya, y0, ya]):
        torch.testing.assert_close(ym[i], ref[i], rtol=1e-5, atol=1e-5)
