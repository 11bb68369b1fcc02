"""C-LoRA: hand-worked penalty, frozen earlier tasks that add up, the library flow, counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltakit as dk
from deltakit.methods.c_lora import CLoraConfig, ForgetPenalty
from tests.library._helpers import mlp


def _set(t, v):
    with torch.no_grad():
        t.copy_(torch.tensor(v, dtype=t.dtype))


def _lin():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2, bias=False))


def _task(model, name, A, B, cfg=None):
    ad = dk.attach(model, cfg or CLoraConfig(r=1, alpha=1.0, targets=["0"]), name=name)
    d = model[0].deltas[name]
    _set(d.lora_A, A)
    _set(d.lora_B, B)
    return ad


def test_hand_worked_penalty():
    """Earlier updates [[1, 0], [0, 0]] and [[0, 0], [0, -2]] sum to P = [[1, 0], [0, -2]]; the
    new dW = [[2, 2], [3, 3]] overlaps them at (0, 0) and (1, 1): ||P ⊙ dW||^2 = 2^2 + (-6)^2 = 40,
    times lambda = 0.5 -> 20. d/dB of it is lambda * 2 (P^2 ⊙ dW) A^T = [[2, 0], [0, 12]] [1, 1]^T = [[2], [12]]."""
    m = _lin()
    t1 = _task(m, "t1", [[1.0, 0.0]], [[1.0], [0.0]])
    t2 = _task(m, "t2", [[0.0, 1.0]], [[0.0], [-2.0]])
    cur = _task(m, "t3", [[1.0, 1.0]], [[2.0], [3.0]], CLoraConfig(r=1, alpha=1.0, forget_weight=0.5, targets=["0"]))
    pen = ForgetPenalty(cur, [t1, t2])
    loss = pen()
    torch.testing.assert_close(loss, torch.tensor(20.0))
    loss.backward()
    torch.testing.assert_close(m[0].deltas["t3"].lora_B.grad, torch.tensor([[2.0], [12.0]]))
    # the earlier tasks' updates add up in the forward, the current one on top
    dk.set_active(m, ["t1", "t2", "t3"])
    x = torch.tensor([[1.0, -1.0]])
    w = m[0].base.weight + torch.tensor([[1.0, 0.0], [0.0, -2.0]]) + torch.tensor([[2.0, 2.0], [3.0, 3.0]])
    torch.testing.assert_close(m(x), x @ w.t())
    assert ForgetPenalty(cur, [])().item() == 0.0                     # the first task: plain LoRA
    with pytest.raises(dk.ConfigError, match="its own earlier task"):
        ForgetPenalty(cur, [cur])
    with pytest.raises(dk.ConfigError, match="expected a 'c_lora' adapter"):
        ForgetPenalty(dk.attach(_lin(), dk.LoraConfig(r=1, targets=["0"])), [])


def test_penalty_steers_away_from_earlier_entries():
    """Minimising only the penalty shrinks the new update where the old one lives, nowhere else."""
    m = _lin()
    t1 = _task(m, "t1", [[1.0, 0.0]], [[1.0], [0.0]])                # changed W[0, 0] only
    cur = _task(m, "t2", [[1.0, 1.0]], [[1.0], [1.0]])
    pen = ForgetPenalty(cur, [t1])
    opt = torch.optim.SGD(cur.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        pen().backward()
        opt.step()
    dw = m[0].deltas["t2"].product().detach()
    assert abs(dw[0, 0]) < 0.05 and dw[1, 1].abs() > 0.5           # from 1 and 1 at the start


def test_continue_from_library(tmp_path):
    """Earlier tasks come from the store: loaded frozen, active together with the new C-LoRA."""
    from deltakit.library import AdapterLibrary
    from deltakit.library.continual import continue_from_library

    lib = AdapterLibrary(tmp_path / "lib")
    for i in range(2):
        model = mlp()
        ad = dk.attach(model, CLoraConfig(r=2, targets=["0", "2"]), name=f"task{i}")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        dk.save_adapter(ad, tmp_path / f"task{i}")
        lib.add(tmp_path / f"task{i}", model=mlp(), name=f"task{i}")
    model = mlp()
    new, prev, pen = continue_from_library(model, lib, ["task0@1", "task1@1"], CLoraConfig(r=2, targets=["0"]),
                                           name="task2")
    assert [a.name for a in prev] == ["task0-v1", "task1-v1"]
    assert all(not p.requires_grad for a in prev for p in a.parameters())
    assert dk.active(model) == ["task0-v1", "task1-v1", "task2"]
    assert new.num_parameters(trainable_only=True) == 2 * (12 + 16)   # r (in + out), target "0" only
    # its penalty is the hand formula on the summed earlier updates of target "0"
    with torch.no_grad():
        for p in new.parameters():
            p.fill_(0.1)
    past = sum(dict(a.delta_weights())["0.weight"] for a in prev)
    dw = model[0].deltas["task2"].product()
    torch.testing.assert_close(pen(), (past * dw).pow(2).sum(), rtol=1e-5, atol=1e-6)
