"""MTLoRA (Agiza et al. 2024) and the task-id seam it reads (deltakit.core.tasks): counts,
the task-agnostic and task-specific paths by hand, rows independent, fit's wrapper."""
from __future__ import annotations

import pytest
import torch

import deltakit as dk
from deltakit.core.tasks import TaskModel, current_task_ids, task_scope
from tests.conftest import make_input, make_model, run

T = 3


def cfg(**kw):
    return dk.get_method("mtlora").config(**kw)


def perturb(adapter, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_task_scope_nests_and_restores():
    assert current_task_ids() is None
    with task_scope([1, 0]):
        with task_scope(torch.tensor([[2], [2]])):
            assert current_task_ids().tolist() == [2, 2]
        assert current_task_ids().tolist() == [1, 0]
    assert current_task_ids() is None


def test_counts_task_block_defaults_to_the_last(tmp_path):
    r = 2
    model = make_model("llama")
    ad = dk.attach(model, cfg(n_tasks=T, r=r, targets=["q_proj", "v_proj"]))
    # q_proj 16 -> 16, v_proj 16 -> 8; block 1 (the last) also holds T task LoRAs
    shared = 2 * (r * (16 + 16) + r * (16 + 8))
    tasks = T * (r * (16 + 16) + r * (16 + 8))
    assert ad.num_parameters(trainable_only=True) == shared + tasks
    assert {p: d.has_tasks for p, d in ad.deltas()} == {
        "model.layers.0.self_attn.q_proj": False, "model.layers.0.self_attn.v_proj": False,
        "model.layers.1.self_attn.q_proj": True, "model.layers.1.self_attn.v_proj": True}
    dk.save_adapter(ad, tmp_path / "ad")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == shared + tasks
    both = dk.attach(make_model("llama"), cfg(n_tasks=T, r=r, targets=["q_proj"], task_layers=(0, 1)))
    assert all(d.has_tasks for _, d in both.deltas())


@pytest.mark.parametrize("mode", ["matrix", "matrixv2"])
def test_paths_by_hand(mode):
    model = make_model("llama")
    ad = dk.attach(model, cfg(n_tasks=T, r=2, shared_scale=1.5, task_scale=3.0, shared_mode=mode,
                              targets=["q_proj"], dropout=0.0))
    perturb(ad)
    top = model.model.layers[1].self_attn.q_proj           # a task block
    low = model.model.layers[0].self_attn.q_proj           # shared only
    d = top.deltas["default"]
    x = torch.randn(3, 4, 16)
    ids = torch.tensor([2, 0, 2])
    with torch.no_grad():
        shared = 1.5 * x @ d.lora_A.t() @ d.lora_B.t()
        task = torch.stack([3.0 * x[i] @ d.lora_task_A[t].t() @ d.lora_task_B[t].t() for i, t in enumerate(ids)])
        expected = top.base(x) + task + (shared if mode == "matrixv2" else 0)
        with task_scope(ids):
            torch.testing.assert_close(top(x), expected)
            dl = low.deltas["default"]
            torch.testing.assert_close(low(x), low.base(x) + 1.5 * x @ dl.lora_A.t() @ dl.lora_B.t())
        torch.testing.assert_close(top(x), top.base(x) + shared)           # no task scope: shared path
        with task_scope([0, 1, 5]), pytest.raises(ValueError, match=r"task ids in \[0, 3\)"):
            top(x)
        with task_scope([0, 1]), pytest.raises(ValueError, match="names 2 rows, the input has 3"):
            top(x)


def test_rows_follow_their_task_and_fit_wrapper():
    model = make_model("gpt2")
    ad = dk.attach(model, cfg(n_tasks=T, r=2, targets=["c_attn", "c_fc"]))
    perturb(ad)
    x = make_input("gpt2")
    ids = torch.tensor([1, 0, 2])
    with task_scope(ids):
        y = run(model, x)
    for i in range(3):
        with task_scope(ids[i:i + 1]):
            torch.testing.assert_close(run(model, x[i:i + 1])[0], y[i], rtol=1e-5, atol=1e-5)
    with task_scope(torch.zeros(3, dtype=torch.long)):
        assert not torch.allclose(run(model, x), y)                      # other tasks, other outputs
    torch.testing.assert_close(TaskModel(model)(x, task_ids=ids).logits, y)


def test_mixed_batch_with_task_ids():
    model = make_model("llama")
    x = make_input("llama")
    c = cfg(n_tasks=T, r=2, targets=["q_proj", "down_proj"])
    a, b = dk.attach(model, c, name="a"), dk.attach(model, c, name="b")
    perturb(a)
    perturb(b, seed=1)
    ids = torch.tensor([2, 1, 0])
    ref = {}
    for name in ("a", "b"):
        dk.set_active(model, name)
        with task_scope(ids):
            ref[name] = run(model, x).detach()
    with dk.disabled(model):
        ref[None] = run(model, x).detach()
    rows = ["b", None, "a"]
    with dk.mixed_batch(model, rows), task_scope(ids):
        y = run(model, x)
    for i, r in enumerate(rows):
        torch.testing.assert_close(y[i], ref[r][i], rtol=1e-5, atol=1e-5)
