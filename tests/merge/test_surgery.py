"""Model Surgery (https://arxiv.org/abs/2407.08770): the region and edit by hand, the probe, and the
whole edit on a tiny LLaMA lowering the probe's score of the undesired behaviour."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from deltakit.merge import model_surgery, pooled_hidden_states, surgery_delta, train_probe

T = torch.tensor


def test_region_and_edit_on_paper():
    # w = [1, 0]; -cos(g, w): a rows [1,0] -> -1, [0,1] -> 0, [-1,0] -> 1; b rows [-1,-1] -> 1/sqrt2, [2,0] -> -1
    weights = {"a": T([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), "b": T([[-1.0, -1.0], [2.0, 0.0]])}
    tv, region = surgery_delta(weights, T([1.0, 0.0]), n_rows=2, alpha=0.5)
    assert region == [("a", 2), ("b", 0)]
    assert torch.equal(tv.dense("a"), T([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0]]))
    assert torch.equal(tv.dense("b"), T([[0.5, 0.0], [0.0, 0.0]]))
    tv3, region3 = surgery_delta(weights, T([1.0, 0.0]), n_rows=3, alpha=-2.0)
    assert region3 == [("a", 2), ("b", 0), ("a", 1)]  # the cosine-0 row next (first of the ties)
    assert torch.equal(tv3.dense("a")[1], T([-2.0, 0.0]))
    edited = tv.apply(weights)
    assert torch.equal(edited["a"][2], T([-0.5, 0.0])) and torch.equal(edited["a"][0], T([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"n_rows: expected 1..5, found 6"):
        surgery_delta(weights, T([1.0, 0.0]), n_rows=6, alpha=1.0)
    with pytest.raises(ValueError, match=r"b: expected rows of size 3 \(I, H\), found \(2, 2\)"):
        surgery_delta({"b": weights["b"]}, T([1.0, 0.0, 0.0]), n_rows=1, alpha=1.0)


def test_probe_separates_separable_features_and_keeps_param_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] - x[:, 3] > 0).long()
    probe = train_probe(x, y, epochs=20, lr=5e-2, batch_size=100)
    # the paper's probe: one linear layer, H x C weights + C biases
    assert sum(p.numel() for p in probe.parameters()) == 6 * 2 + 2
    assert float((probe(x).argmax(-1) == y).float().mean()) > 0.95
    again = train_probe(x, y, epochs=20, lr=5e-2, batch_size=100)
    assert torch.equal(probe.weight, again.weight)  # seeded
    # its row for class 1 points along the separating direction e0 - e3
    w = probe.weight.detach()[1] - probe.weight.detach()[0]
    cos = float(w @ T([1.0, 0, 0, -1, 0, 0]) / (w.norm() * math.sqrt(2)))
    assert cos > 0.9


def _batches(seed, n=6):
    """Label 1 ('undesired') when tokens 96..127 appear; padding on some rows (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (16, 12), generator=g)
        y = torch.randint(0, 2, (16,), generator=g)
        put = (torch.rand(16, 12, generator=g) < 0.4) & y[:, None].bool()
        ids = torch.where(put, torch.randint(96, 128, (16, 12), generator=g), ids)
        mask = torch.ones(16, 12, dtype=torch.long)
        mask[:4, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return out


@pytest.mark.slow
def test_surgery_on_a_tiny_llama_lowers_the_undesired_score():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = model_surgery(model, _batches(1), alpha=2.0, n_rows=24, epochs=60, lr=1e-2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not modified
    assert res.probe_accuracy > 0.75 and len(res.region) == 24
    assert sorted(res.task_vector.keys()) == [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2)]
    changed = sum(int((res.task_vector.dense(n).abs().sum(1) > 0).sum()) for n in res.task_vector.keys())
    assert changed == 24  # exactly the region's rows move, each by alpha * w
    n, j = res.region[0]
    assert torch.allclose(res.task_vector.dense(n)[j], 2.0 * res.direction)

    def undesired(m, data):
        f, y = pooled_hidden_states(m, data)
        with torch.no_grad():
            return float(torch.softmax(res.probe(f), -1)[y == 1, 1].mean())

    edited = res.task_vector.apply(copy.deepcopy(model))
    test = _batches(2)
    # measured: 0.63 before, 0.36 after (alpha 2, 24 of 128 gate rows); the release's sign (+alpha w on
    # the most anti-aligned rows) lowers the probe's score of the undesired class on held-out inputs
    assert undesired(edited, test) < undesired(model, test) - 0.15
    with pytest.raises(ValueError, match="expected FFN gate weights"):
        model_surgery(model, _batches(1, n=1), alpha=1.0, targets=["nope.weight"], epochs=1)
