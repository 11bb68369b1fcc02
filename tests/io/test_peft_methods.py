"""peft interop beyond plain LoRA: every converter in deltakit.io.peft_methods, checked against
peft itself on tiny BERT, GPT-2 and Llama (peft's outputs == deltakit's within TOL, both ways)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import deltakit as dk
from deltakit.io.peft import CONFIG, PeftFormatError, export_peft, import_peft
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TOL = 1e-5
BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def _ids(seed=0):
    return torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    """Logits and the last hidden states: BERT's random head gives logits of ~1e-2, so the
    hidden states (~1) are what shows a small adapter's effect."""
    with torch.no_grad():
        o = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([o.logits.flatten(), o.hidden_states[-1].flatten()])


def _changes(model, ids, ref):
    """The adapter is not a no-op: disabling it moves the output by 100 x the parity tolerance."""
    with dk.disabled(model):
        return (_out(model, ids) - ref).abs().max().item() > 100 * TOL


def _randomise(params, seed):
    """Every trainable tensor random and non-trivial (peft and deltakit start many at zero / one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_import_roundtrip(kind, peft_config, tmp_path, seed=0, *, export=True, mergeable=True):
    """peft adapter -> import_peft == peft (merged too); then export_peft of the import -> peft == peft.
    Returns the imported adapter for method-specific checks."""
    torch.manual_seed(seed)
    base = BUILD[kind]().eval()
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    pm = peft.get_peft_model(base, copy.deepcopy(peft_config)).eval()
    _randomise(pm.named_parameters(), seed + 1)
    pm.save_pretrained(tmp_path / "p")
    ids = _ids()
    ref = _out(pm, ids)

    ad = import_peft(fresh, tmp_path / "p", name="imp")
    fresh.eval()
    assert (_out(fresh, ids) - ref).abs().max().item() <= TOL
    assert _changes(fresh, ids, ref)
    if export:
        export_peft(ad, tmp_path / "back")
        back = peft.PeftModel.from_pretrained(fresh2, tmp_path / "back").eval()
        assert (_out(back, ids) - ref).abs().max().item() <= TOL
    if mergeable:
        ad.merge()
        assert (_out(fresh, ids) - ref).abs().max().item() <= TOL
        ad.unmerge()
    return ad


def deltakit_export(kind, config, tmp_path, seed=0):
    """deltakit adapter (random weights) -> export_peft -> peft == deltakit. Returns the written config."""
    torch.manual_seed(seed)
    base = BUILD[kind]().eval()
    fresh = copy.deepcopy(base)
    ad = dk.attach(base, config)
    _randomise(ad.named_parameters(), seed + 1)
    ids = _ids()
    ref = _out(base, ids)
    assert _changes(base, ids, ref)
    export_peft(ad, tmp_path / "out")
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    assert (_out(pm, ids) - ref).abs().max().item() <= TOL
    return json.loads((tmp_path / "out" / CONFIG).read_text())


# ---------------------------------------------------------------------------- LoRA extensions
LORA_CASES = {
    "bert_rank_and_alpha_pattern": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "value", "key"], rank_pattern={"value": 2},
        alpha_pattern={"query": 32}, modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_dora_rslora_rank_pattern": ("gpt2", dict(
        r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_rslora=True,
        use_dora=True, rank_pattern={"c_proj": 3}, task_type="CAUSAL_LM")),
    "llama_dora_alpha_pattern": ("llama", dict(
        r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, lora_dropout=0.1,
        alpha_pattern={"down_proj": 4}, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_extensions_import_match_peft(case, tmp_path):
    kind, cfg = LORA_CASES[case]
    ad = peft_import_roundtrip(kind, peft.LoraConfig(init_lora_weights=False, **cfg), tmp_path)
    assert ad.spec.name == ("dora" if cfg.get("use_dora") else "lora")
    assert ad.config.r == cfg["r"]  # the largest rank; smaller ones are zero-padded
    state = ad.state_dict()
    for path, delta in ad.deltas():
        if "rank_pattern" in cfg and any(path.endswith(k) for k in cfg["rank_pattern"]):
            k = next(v for key, v in cfg["rank_pattern"].items() if path.endswith(key))
            assert not state[f"{path}.lora_A"][k:].any() and not state[f"{path}.lora_B"][:, k:].any()


@pytest.mark.parametrize("kind, targets", [("bert", ("query", "value")), ("gpt2", ("c_attn",)),
                                           ("llama", ("q_proj", "up_proj"))])
def test_dora_exports_to_peft(kind, targets, tmp_path):
    written = deltakit_export(kind, dk.get_method("dora").config(r=3, alpha=5, targets=targets), tmp_path)
    assert written["use_dora"] is True and written["r"] == 3


def test_dora_magnitude_is_peft_magnitude(tmp_path):
    """peft's lora_magnitude_vector and deltakit's DoRA magnitude are the same per-output norm at init."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    fresh = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "p")
    ours = dk.attach(copy.deepcopy(fresh), dk.get_method("dora").config(r=2, targets=("q_proj",)))
    ad = import_peft(fresh, tmp_path / "p")
    a, b = ad.state_dict(), ours.state_dict()
    for k in a:
        if k.endswith("magnitude"):
            assert torch.allclose(a[k], b[k], atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(bias="lora_only"), "bias='lora_only' trains the base model's biases"),
    (dict(rank_pattern={"query": 3}), r"'bert.encoder.layer.0.attention.self.query' has rank 4 tensors, the config "
                                      r"declares r=3"),
])
def test_lora_config_errors(tmp_path, changes, message):
    torch.manual_seed(0)
    base = tiny_bert().eval()
    fresh = copy.deepcopy(base)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"])).save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / CONFIG).read_text())
    cfg.update(changes)
    (tmp_path / "p" / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(PeftFormatError, match=message) as e:
        import_peft(fresh, tmp_path / "p")
    assert "\n" not in str(e.value) and dk.adapters(fresh) == {}


def test_dora_without_peft_equivalent_is_refused(tmp_path):
    model = tiny_bert()
    ad = dk.attach(model, dk.get_method("dora").config(r=2, targets=("query",), detach_norm=False))
    with pytest.raises(PeftFormatError, match="detach_norm=False has no peft equivalent"):
        export_peft(ad, tmp_path / "x")


# ---------------------------------------------------------------------------- IA3
IA3_CASES = {
    "bert_regex_feedforward": ("bert", dict(
        target_modules=["key", "value", "output.dense"], feedforward_modules=r".*layer\.\d+\.output\.dense",
        modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                 fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "llama": ("llama", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(IA3_CASES))
def test_ia3_import_matches_peft(case, tmp_path):
    kind, cfg = IA3_CASES[case]
    ad = peft_import_roundtrip(kind, peft.IA3Config(**cfg), tmp_path)
    ff = [p for p, d in ad.deltas() if d.feedforward]
    assert ff and len(ff) == 2 and all("output.dense" in p or "c_proj" in p or "down_proj" in p for p in ff)
    if kind == "bert":  # attention.output.dense is not feed-forward under that regex
        assert not any("attention.output" in p for p in ff) and any("attention.output" in p for p, _ in ad.deltas())


@pytest.mark.parametrize("kind, targets, ff", [
    ("bert", ("key", "value", r"re:(.*\.)?layer\.\d+\.output\.dense"), (r"re:(.*\.)?layer\.\d+\.output\.dense",)),
    ("gpt2", ("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    ("llama", ("k_proj", "down_proj"), ("down_proj",))])
def test_ia3_exports_to_peft(kind, targets, ff, tmp_path):
    from deltakit.methods.ia3 import IA3Config
    written = deltakit_export(kind, IA3Config(targets=targets, feedforward=ff), tmp_path)
    assert written["peft_type"] == "IA3" and len(written["feedforward_modules"]) == 2


# ---------------------------------------------------------------------------- LoHa
# peft's LoHa / LoKr wrap nn.Linear and nn.Conv2d, not GPT-2's Conv1D: on GPT-2 the head
# (nn.Linear, its weight tied to the token embedding) is the target, and merging there would
# also move the embedding, so that case checks the unmerged forward only.
LYCORIS_CASES = {
    "bert": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_head": ("gpt2", dict(target_modules=["lm_head"], task_type="CAUSAL_LM")),
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
def test_loha_import_matches_peft(case, tmp_path):
    kind, cfg = LYCORIS_CASES[case]
    ad = peft_import_roundtrip(kind, peft.LoHaConfig(r=3, alpha=5, **cfg), tmp_path, mergeable=kind != "gpt2")
    assert (ad.spec.name, ad.config.r, ad.config.alpha) == ("loha", 3, 5.0)


def test_loha_rank_and_alpha_pattern_pad_to_the_largest_rank(tmp_path):
    cfg = dict(r=3, alpha=5, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 1},
               alpha_pattern={"up_proj": 9}, task_type="CAUSAL_LM")
    ad = peft_import_roundtrip("llama", peft.LoHaConfig(**cfg), tmp_path)
    # alpha of the first rank-3 target in file order (peft sorts keys: mlp.up_proj first)
    assert (ad.config.r, ad.config.alpha) == (3, 9.0)
    sd = ad.state_dict()
    v = "model.layers.0.self_attn.v_proj"
    assert not sd[f"{v}.hada_w1_a"][:, 1:].any() and not sd[f"{v}.hada_w2_b"][1:].any()


@pytest.mark.parametrize("kind, targets", [("bert", ("query", "value")), ("llama", ("q_proj", "down_proj"))])
def test_loha_exports_to_peft(kind, targets, tmp_path):
    written = deltakit_export(kind, dk.get_method("loha").config(r=2, alpha=3, targets=targets), tmp_path)
    assert (written["peft_type"], written["r"], written["alpha"]) == ("LOHA", 2, 3)


def test_lycoris_export_refuses_conv1d(tmp_path):
    ad = dk.attach(tiny_gpt2(), dk.get_method("loha").config(r=2, targets=("c_attn",)))
    with pytest.raises(PeftFormatError, match="'transformer.h.0.attn.c_attn' is a Conv1D; peft's LoHa supports"):
        export_peft(ad, tmp_path / "x")


# ---------------------------------------------------------------------------- LoKr
@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
@pytest.mark.parametrize("lokr", [dict(r=1, alpha=3), dict(r=8, alpha=3, decompose_factor=2),
                                  dict(r=1, alpha=2, decompose_both=True)], ids=["low_rank", "both_full", "both_low"])
def test_lokr_import_matches_peft(case, lokr, tmp_path):
    kind, cfg = LYCORIS_CASES[case]
    ad = peft_import_roundtrip(kind, peft.LoKrConfig(**lokr, **cfg), tmp_path, mergeable=kind != "gpt2")
    assert (ad.config.r, ad.config.factor) == (lokr["r"], lokr.get("decompose_factor", -1))
    d = next(d for _, d in ad.deltas())
    # r=8 with factor 2 on 16 x 16: w1 (2, 2), w2 (8, 8) full, so peft's alpha / r scale moved into w1
    # (GPT-2's head is 64 x 16: w2 (32, 8) stays low rank)
    assert kind == "gpt2" or d.low_rank_w2 == (lokr["r"] == 1) and d.low_rank_w1 == lokr.get("decompose_both", False)


def test_lokr_full_factors_carry_peft_scale_in_w1(tmp_path):
    """Both factors full: deltakit's scale is 1 (LyCORIS), peft's alpha / r = 3 / 8, so w1 = peft's w1 * 3 / 8."""
    torch.manual_seed(0)
    base = tiny_bert().eval()
    fresh = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoKrConfig(r=8, alpha=3, decompose_factor=2, target_modules=["query"]))
    _randomise(pm.named_parameters(), 1)
    pm.save_pretrained(tmp_path / "p")
    sd = peft.get_peft_model_state_dict(pm)
    ad = import_peft(fresh, tmp_path / "p")
    path = "bert.encoder.layer.0.attention.self.query"
    w1 = ad.state_dict()[f"{path}.lokr_w1"]
    assert w1.shape == (2, 2) and torch.allclose(w1, sd[f"base_model.model.{path}.lokr_w1"] * 3 / 8, atol=0)


@pytest.mark.parametrize("kind, targets", [("bert", ("query", "value")), ("llama", ("q_proj", "down_proj"))])
@pytest.mark.parametrize("over", [dict(r=1, alpha=3), dict(r=8, alpha=2, factor=2)], ids=["low_rank", "both_full"])
def test_lokr_exports_to_peft(kind, targets, over, tmp_path):
    written = deltakit_export(kind, dk.get_method("lokr").config(targets=targets, **over), tmp_path)
    assert (written["peft_type"], written["r"], written["decompose_factor"]) == ("LOKR", over["r"],
                                                                                  over.get("factor", -1))


def test_lokr_factor_order_that_differs_from_peft_is_refused(tmp_path):
    """factor 8 on dim 16: peft's split is (8, 2), deltakit's (2, 8)."""
    ad = dk.attach(tiny_bert(), dk.get_method("lokr").config(r=1, factor=8, targets=("query",)))
    with pytest.raises(PeftFormatError, match=r"decompose_factor=8 splits in=16 as \(8, 2\) in peft but \(2, 8\)"):
        export_peft(ad, tmp_path / "x")


# ---------------------------------------------------------------------------- VeRA
VERA_CASES = {
    "bert": ("bert", dict(r=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                          task_type="SEQ_CLS")),
    "gpt2_conv1d_no_saved_projection": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                     save_projection=False, projection_prng_key=7,
                                                     task_type="CAUSAL_LM")),
    "llama_mixed_shapes": ("llama", dict(r=6, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                         projection_prng_key=3, d_initial=0.5, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(VERA_CASES))
def test_vera_import_matches_peft(case, tmp_path):
    kind, cfg = VERA_CASES[case]
    ad = peft_import_roundtrip(kind, peft.VeraConfig(**cfg), tmp_path)
    assert (ad.config.r, ad.config.seed) == (cfg["r"], cfg.get("projection_prng_key", 0))


@pytest.mark.parametrize("kind, targets", [("bert", ("query", "value")), ("gpt2", ("c_attn", "mlp.c_proj")),
                                           ("llama", ("k_proj", "down_proj"))])
def test_vera_exports_to_peft(kind, targets, tmp_path):
    written = deltakit_export(kind, dk.get_method("vera").config(r=5, seed=11, targets=targets), tmp_path)
    assert (written["projection_prng_key"], written["save_projection"]) == (11, True)


def test_vera_projection_that_deltakit_would_not_regenerate_is_refused(tmp_path):
    from deltakit.io.files import load_tensors, save_tensors
    from deltakit.io.peft import WEIGHTS
    torch.manual_seed(0)
    base = tiny_llama().eval()
    fresh = copy.deepcopy(base)
    peft.get_peft_model(base, peft.VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "p")
    state = load_tensors(tmp_path / "p" / WEIGHTS)
    state["base_model.vera_A"] = state["base_model.vera_A"] * 1.5
    save_tensors(tmp_path / "p" / WEIGHTS, state)
    with pytest.raises(PeftFormatError, match=r"base_model.vera_A \(4, 16\) differs from deltakit's regeneration"):
        import_peft(fresh, tmp_path / "p")
    assert dk.adapters(fresh) == {}


# ---------------------------------------------------------------------------- LN tuning
LN_CASES = {
    "bert": ("bert", dict(target_modules=["LayerNorm"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2": ("gpt2", dict(target_modules=["ln_1", "ln_f"], task_type="CAUSAL_LM")),
    "llama_rmsnorm": ("llama", dict(target_modules=["input_layernorm", "norm"], task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(LN_CASES))
def test_ln_tuning_import_matches_peft(case, tmp_path):
    kind, cfg = LN_CASES[case]
    ad = peft_import_roundtrip(kind, peft.LNTuningConfig(**cfg), tmp_path)
    assert ad.spec.name == "ln_tuning" and len(list(ad.deltas())) >= 3


@pytest.mark.parametrize("kind, targets", [("bert", ("LayerNorm",)), ("gpt2", ("ln_2",)),
                                           ("llama", ("post_attention_layernorm",))])
def test_ln_tuning_exports_to_peft(kind, targets, tmp_path):
    from deltakit.methods.ln_tuning import LNTuningConfig
    written = deltakit_export(kind, LNTuningConfig(targets=targets), tmp_path)
    assert written["peft_type"] == "LN_TUNING"


# ---------------------------------------------------------------------------- AdaLoRA
ADALORA_CASES = {
    "bert": ("bert", dict(init_r=4, target_r=2, lora_alpha=6, target_modules=["query", "value"],
                          modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_conv1d": ("gpt2", dict(init_r=3, target_r=2, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                 task_type="CAUSAL_LM")),
    "llama": ("llama", dict(init_r=4, target_r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                            task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(ADALORA_CASES))
def test_adalora_import_matches_peft(case, tmp_path):
    kind, cfg = ADALORA_CASES[case]
    ad = peft_import_roundtrip(kind, peft.AdaLoraConfig(total_step=100, **cfg), tmp_path)
    assert (ad.config.init_r, ad.config.alpha) == (cfg["init_r"], cfg["lora_alpha"])
    assert all(d.rank() == cfg["init_r"] for _, d in ad.deltas())


def test_adalora_pruned_rank_pattern_matches_peft_reloaded(tmp_path):
    """A pruned peft AdaLoRA is saved resized to the kept components (rank_pattern) and resized again on
    load: the reference is peft's reloaded model, and the import pads back to init_r with the pruned
    components OFF; its export carries the same rank_pattern."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    fresh, fresh2, fresh3 = (copy.deepcopy(base) for _ in range(3))
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=4, total_step=100,
                                                      target_modules=["q_proj", "down_proj"]))
    _randomise(pm.named_parameters(), 1)
    masks = {"model.layers.0.self_attn.q_proj": [True, False, True, False],
             "model.layers.1.mlp.down_proj": [False, False, False, True]}
    pm.peft_config["default"].rank_pattern = {f"{p}.lora_E.default": m for p, m in masks.items()}
    pm.save_pretrained(tmp_path / "p")
    ids = _ids()
    ref = _out(peft.PeftModel.from_pretrained(fresh, tmp_path / "p").eval(), ids)

    ad = import_peft(fresh2, tmp_path / "p")
    assert (_out(fresh2, ids) - ref).abs().max().item() <= TOL and _changes(fresh2, ids, ref)
    ranks = {p: d.rank() for p, d in ad.deltas()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 1
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    export_peft(ad, tmp_path / "back")
    written = json.loads((tmp_path / "back" / CONFIG).read_text())
    assert written["rank_pattern"]["model.layers.1.mlp.down_proj.lora_E"] == [True, False, False, False]
    back = peft.PeftModel.from_pretrained(fresh3, tmp_path / "back").eval()
    assert (_out(back, ids) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("kind, targets", [("bert", ("query", "value")), ("gpt2", ("c_attn", "c_fc")),
                                           ("llama", ("k_proj", "up_proj"))])
def test_adalora_exports_to_peft(kind, targets, tmp_path):
    written = deltakit_export(kind, dk.get_method("adalora").config(init_r=3, target_r=1, alpha=5, targets=targets),
                              tmp_path)
    assert (written["peft_type"], written["init_r"], written["total_step"]) == ("ADALORA", 3, 1)


# ---------------------------------------------------------------------------- OFT
@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 8])
def test_cayley_neumann_is_peft_series(terms):
    from peft.tuners.oft.layer import OFTRotationModule
    from deltakit.methods.oft import cayley_neumann, skew
    q = torch.randn(3, 6, generator=torch.Generator().manual_seed(terms)) * 0.3
    peft_r = OFTRotationModule(3, 6, 4, 12)._cayley_batch(q, 4, True, terms)
    assert torch.allclose(cayley_neumann(skew(q, 4), terms), peft_r, atol=1e-6)


OFT_CASES = {
    "bert_neumann": ("bert", dict(oft_block_size=4, r=0, target_modules=["query", "value"],
                                  modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_head_exact": ("gpt2", dict(oft_block_size=8, r=0, target_modules=["lm_head"], use_cayley_neumann=False,
                                     task_type="CAUSAL_LM")),
    "llama_r_blocks_coft_terms": ("llama", dict(r=4, oft_block_size=0, target_modules=["q_proj", "up_proj",
                                                "down_proj"], coft=True, eps=0.5, num_cayley_neumann_terms=7,
                                                task_type="CAUSAL_LM")),
    "llama_exact": ("llama", dict(oft_block_size=4, r=0, target_modules=["k_proj", "o_proj"],
                                  use_cayley_neumann=False, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(OFT_CASES))
def test_oft_import_matches_peft(case, tmp_path):
    kind, cfg = OFT_CASES[case]
    ad = peft_import_roundtrip(kind, peft.OFTConfig(**cfg), tmp_path, mergeable=kind != "gpt2")
    assert ad.config.cayley == ("neumann" if cfg.get("use_cayley_neumann", True) else "exact")


@pytest.mark.parametrize("kind, targets, cayley", [("bert", ("query", "value"), "exact"),
                                                   ("llama", ("q_proj", "down_proj"), "neumann")])
def test_oft_exports_to_peft(kind, targets, cayley, tmp_path):
    from deltakit.methods.oft import OFTConfig
    written = deltakit_export(kind, OFTConfig(block_size=4, cayley=cayley, neumann_terms=6, targets=targets),
                              tmp_path)
    assert written["use_cayley_neumann"] == (cayley == "neumann")


# ---------------------------------------------------------------------------- prompt tuning
def _out_virtual(model, ids, n):
    """_out with peft's n virtual positions dropped (deltakit strips them from its outputs)."""
    with torch.no_grad():
        o = model(input_ids=ids, output_hidden_states=True)
    logits = o.logits[:, n:] if o.logits.dim() == 3 else o.logits   # causal LM: per position
    return torch.cat([logits.flatten(), o.hidden_states[-1][:, n:].flatten()])


PROMPT_CASES = {
    "bert_cls_head": ("bert", dict(task_type="SEQ_CLS")),   # peft saves the head as base_model.classifier.*
    "gpt2": ("gpt2", dict(task_type="CAUSAL_LM")),
    "llama": ("llama", dict(task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_prompt_tuning_import_and_back_match_peft(case, tmp_path):
    kind, cfg = PROMPT_CASES[case]
    n = 3
    torch.manual_seed(0)
    base = BUILD[kind]().eval()
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.PromptTuningConfig(num_virtual_tokens=n, **cfg)).eval()
    _randomise(pm.named_parameters(), 1)
    pm.save_pretrained(tmp_path / "p")
    ids = _ids()
    ref = _out_virtual(pm, ids, n)

    ad = import_peft(fresh, tmp_path / "p")
    head = {"classifier": "full"} if kind == "bert" else {}
    assert ad.targets == {BUILD[kind]().base_model_prefix: "prompt_tuning", **head}
    assert (_out(fresh, ids) - ref).abs().max().item() <= TOL and _changes(fresh, ids, ref)
    export_peft(ad, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(fresh2, tmp_path / "back").eval()
    assert (_out_virtual(back, ids, n) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_prompt_tuning_exports_to_peft(kind, tmp_path):
    torch.manual_seed(0)
    base = BUILD[kind]().eval()
    fresh = copy.deepcopy(base)
    head = ("classifier",) if kind == "bert" else ()
    ad = dk.attach(base, dk.get_method("prompt_tuning").config(num_virtual_tokens=4, modules_to_save=head))
    _randomise(ad.named_parameters(), 1)
    ids = _ids()
    ref = _out(base, ids)
    assert _changes(base, ids, ref)
    export_peft(ad, tmp_path / "out")
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    assert (_out_virtual(pm, ids, 4) - ref).abs().max().item() <= TOL


def test_prompt_tuning_export_needs_a_task_model(tmp_path):
    ad = dk.attach(tiny_bert(), dk.get_method("prompt_tuning").config(num_virtual_tokens=2))
    with pytest.raises(PeftFormatError, match="only through a task model .* without its head in modules_to_save"):
        export_peft(ad, tmp_path / "x")


# ---------------------------------------------------------------------------- prefix tuning
# peft 0.21 refuses prefix tuning on BERT with this transformers ("Model does not support past key
# values"), so there is no peft reference for it: GPT-2 and Llama only.
@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_prefix_tuning_import_and_back_match_peft(case, tmp_path):
    kind, cfg = PROMPT_CASES[case]
    torch.manual_seed(0)
    base = BUILD[kind]().eval()
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(num_virtual_tokens=3, **cfg)).eval()
    _randomise(pm.named_parameters(), 1)
    pm.save_pretrained(tmp_path / "p")
    ids = _ids()
    ref = _out(pm, ids)   # a prefix is a past cache: peft's outputs have the base's positions

    ad = import_peft(fresh, tmp_path / "p")
    assert len(list(ad.deltas())) == 3   # the backbone (positions) and 2 attention layers
    assert (_out(fresh, ids) - ref).abs().max().item() <= TOL and _changes(fresh, ids, ref)
    export_peft(ad, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(fresh2, tmp_path / "back").eval()
    assert (_out(back, ids) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("reparam", [False, True])
def test_prefix_tuning_exports_to_peft(kind, reparam, tmp_path):
    deltakit_export(kind, dk.get_method("prefix_tuning").config(num_virtual_tokens=4, reparam=reparam,
                                                                reparam_hidden=6), tmp_path)


def test_prefix_tuning_export_without_position_shift_is_refused(tmp_path):
    ad = dk.attach(tiny_llama(), dk.get_method("prefix_tuning").config(num_virtual_tokens=2, targets=("self_attn",)))
    with pytest.raises(PeftFormatError, match=r"shifts positions by n; the adapter leaves out \['model'\]"):
        export_peft(ad, tmp_path / "x")


# ---------------------------------------------------------------------------- VB-LoRA
VBLORA_CASES = {
    "bert_topk_only": ("bert", dict(target_modules=["query", "value"], save_only_topk_weights=True,
                                    modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "llama": ("llama", dict(target_modules=["q_proj", "down_proj"], topk=3, save_only_topk_weights=True,
                            task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(VBLORA_CASES))
def test_vb_lora_import_matches_peft(case, tmp_path):
    kind, cfg = VBLORA_CASES[case]
    peft_cfg = peft.VBLoRAConfig(r=2, num_vectors=6, vector_length=4, **{"topk": 2, **cfg})
    torch.manual_seed(0)
    base = BUILD[kind]().eval()
    fresh, fresh2, fresh3 = (copy.deepcopy(base) for _ in range(3))
    pm = peft.get_peft_model(base, peft_cfg).eval()
    _randomise(pm.named_parameters(), 1)
    pm.save_pretrained(tmp_path / "p")
    ids = _ids()
    ref = _out(peft.PeftModel.from_pretrained(fresh2, tmp_path / "p").eval(), ids)  # what peft reads back
    assert cfg.get("save_only_topk_weights") or (_out(pm, ids) - ref).abs().max().item() <= TOL
    ad = import_peft(fresh, tmp_path / "p")
    assert (_out(fresh, ids) - ref).abs().max().item() <= TOL and _changes(fresh, ids, ref)
    assert ad.config.save_only_topk == bool(cfg.get("save_only_topk_weights"))
    ad.merge()
    assert (_out(fresh, ids) - ref).abs().max().item() <= TOL
    ad.unmerge()
    export_peft(ad, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(fresh3, tmp_path / "back").eval()
    assert (_out(back, ids) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("kind, targets", [("bert", ("query", "value")), ("gpt2", ("c_attn",)),
                                           ("llama", ("k_proj", "up_proj"))])
@pytest.mark.parametrize("topk_only", [False, True])
def test_vb_lora_exports_to_peft(kind, targets, topk_only, tmp_path):
    written = deltakit_export(kind, dk.get_method("vb_lora").config(r=2, num_vectors=5, vector_length=4, topk=2,
                                                                    save_only_topk=topk_only, targets=targets),
                              tmp_path)
    assert written["save_only_topk_weights"] == topk_only


# ---------------------------------------------------------------------------- PiSSA / OLoRA
RESIDUAL_CASES = {
    "bert_pissa_rank_pattern": ("bert", dict(init_lora_weights="pissa", r=4, lora_alpha=8,
                                             target_modules=["query", "value"], rank_pattern={"value": 2},
                                             modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "gpt2_pissa_conv1d_rslora": ("gpt2", dict(init_lora_weights="pissa", r=3, lora_alpha=5, use_rslora=True,
                                              target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                              task_type="CAUSAL_LM")),
    "llama_olora": ("llama", dict(init_lora_weights="olora", r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                                  task_type="CAUSAL_LM")),
    "bert_olora": ("bert", dict(init_lora_weights="olora", r=3, lora_alpha=3, target_modules=["key", "value"])),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_CASES))
def test_pissa_and_olora_import_matches_peft(case, tmp_path):
    """peft's PiSSA / OLoRA adapters are relative to a rewritten base W - s B0 A0; the import
    recomputes (A0, B0) from the untouched model and carries [A; A0], [B, -B0] at rank 2r."""
    kind, cfg = RESIDUAL_CASES[case]
    ad = peft_import_roundtrip(kind, peft.LoraConfig(**cfg), tmp_path)
    assert ad.config.r == 2 * cfg["r"]


def test_lokr_non_uniform_rank_pattern_is_one_clear_error(tmp_path):
    """LoKr's rank decides which factors are low rank per target, so padding cannot equalise it."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    fresh = copy.deepcopy(base)
    peft.get_peft_model(base, peft.LoKrConfig(r=1, target_modules=["q_proj", "v_proj"],
                                              rank_pattern={"v_proj": 2})).save_pretrained(tmp_path / "p")
    with pytest.raises(PeftFormatError, match=r"non-uniform rank \(r / rank_pattern\) .* deltakit's LoKr: 1 at .*, 2 at"):
        import_peft(fresh, tmp_path / "p")
    assert dk.adapters(fresh) == {}


# ---------------------------------------------------------------------------- registry
def test_converter_registry_refuses_duplicates():
    from deltakit.io.peft_methods import PeftConverter, register_converter
    with pytest.raises(ValueError, match="converter for 'LORA' is already registered"):
        register_converter(type("Again", (PeftConverter,), {"peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"deltakit method\(s\) \['dora'\] already export"):
        register_converter(type("Dora2", (PeftConverter,), {"peft_type": "X_DORA", "methods": ("dora",)}))
