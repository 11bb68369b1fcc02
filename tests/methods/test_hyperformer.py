"""HyperFormer++ (Karimi Mahabadi et al. 2021): the parameter count formula, the generated
adapter against the official code's formulas written out (github.com/rabeehk/hyperformer,
AdapterLayersOneHyperNetController + MetaLayersAdapterController), tasks per row."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltakit as dk
from deltakit.core.tasks import TaskModel, task_scope
from tests.conftest import make_input, make_model, run

D, L = 16, 2


def cfg(**kw):
    return dk.get_method("hyperformer").config(**kw)


def perturb(adapter, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_counts_shared_hypernetwork(tmp_path):
    T, t, hid, tp, rf = 3, 8, 12, 6, 4
    m = D // rf
    model = make_model("bert")
    ad = dk.attach(model, cfg(n_tasks=T, task_embedding_dim=t, task_hidden_dim=hid, projected_task_embedding_dim=tp,
                              reduction_factor=rf, default_task=0))
    expected = (T * t + L * t + 2 * t + (3 * t * hid + hid) + (hid * tp + tp) + 2 * tp
                + (tp + 1) * (2 * D * m + m + D) + 2 * (tp + 1) * D)
    assert ad.num_parameters(trainable_only=True) == expected
    assert sorted(ad.targets) == sorted(f"bert.encoder.layer.{i}.{s}" for i in range(L)
                                        for s in ("attention.output.dense", "output.dense"))
    dk.save_adapter(ad, tmp_path / "ad")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == expected


def _official(net, task, block, position, h, act):
    """One row's adapter as the official code computes it (unique hypernet, post layer norm)."""
    emb = torch.cat([net.task_embedding[task], net.block_embedding[block], net.position_embedding[position]])
    emb = net.norm(net.task_projector(emb))
    d, m = net.d, net.m
    down = F.linear(h, net.down(emb).view(m, d), net.down_bias(emb))
    up = F.linear(act(down), net.up(emb).view(d, m), net.up_bias(emb))
    return h + F.layer_norm(up, (d,), weight=net.gamma(emb), bias=net.beta(emb))


def test_generated_adapters_by_hand():
    model = make_model("bert")
    ad = dk.attach(model, cfg(n_tasks=3, task_embedding_dim=8, task_hidden_dim=8, projected_task_embedding_dim=8,
                              reduction_factor=4))
    perturb(ad)
    net = ad.shared
    gelu_new = lambda x: F.gelu(x, approximate="tanh")                      # noqa: E731
    x_ffn = torch.randn(2, 5, 32)
    x_att = torch.randn(2, 5, D)
    ids = torch.tensor([2, 0])
    ffn = model.bert.encoder.layer[1].output.dense                           # block 1, position 0
    att = model.bert.encoder.layer[0].attention.output.dense                 # block 0, position 1
    with torch.no_grad(), task_scope(ids):
        y_ffn, y_att = ffn(x_ffn), att(x_att)
        for i, task in enumerate(ids.tolist()):
            torch.testing.assert_close(y_ffn[i], _official(net, task, 1, 0, ffn.base(x_ffn[i]), gelu_new))
            torch.testing.assert_close(y_att[i], _official(net, task, 0, 1, att.base(x_att[i]), gelu_new))
    with pytest.raises(ValueError, match="outside a task scope with default_task=None"):
        ffn(x_ffn)


def test_tasks_per_row_and_fit_wrapper():
    model = make_model("llama")
    ad = dk.attach(model, cfg(n_tasks=3, task_embedding_dim=8, task_hidden_dim=8, projected_task_embedding_dim=8,
                              reduction_factor=4))
    perturb(ad)
    x = make_input("llama")
    ids = torch.tensor([1, 2, 0])
    with task_scope(ids):
        y = run(model, x)
    for i in range(3):
        with task_scope(ids[i:i + 1]):
            torch.testing.assert_close(run(model, x[i:i + 1])[0], y[i], rtol=1e-5, atol=1e-5)
    with task_scope(torch.zeros(3, dtype=torch.long)):
        assert not torch.allclose(run(model, x)[1:], y[1:])                  # the generated adapters differ
    torch.testing.assert_close(TaskModel(model)(x, task_ids=ids).logits, y)
    with task_scope([0, 1, 3]), pytest.raises(ValueError, match=r"task ids in \[0, 3\)"):
        run(model, x)
