"""LoRA under autocast: an input already in the autocast dtype is not cast up to the fp32 factors
and back (a pass over the activations each way, forward and backward), and no number changes:
output and every gradient equal the round-trip maths bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltakit as dk


def _reference(x, base, A, B, scale):
    """The round trip the library skips: x -> fp32 -> (autocast) bf16 in each matmul."""
    out = base(x)
    return out + ((x.float() @ A.t()) * scale @ B.t()).to(out.dtype)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_autocast_lora_equals_the_round_trip_bit_for_bit(x_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    ad = dk.attach(model, dk.LoraConfig(r=4, alpha=8, targets=("0",)))
    d = next(d for _, d in ad.deltas())
    with torch.no_grad():
        d.lora_B.normal_()
    x = torch.randn(3, 5, 24).to(x_dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        ref = _reference(x_ref, model[0].base, d.lora_A, d.lora_B, d.scale)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    grads = torch.autograd.grad(out, (x, d.lora_A, d.lora_B), g.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, (x_ref, d.lora_A, d.lora_B), g.to(ref.dtype))
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert grads[1].abs().sum() > 0 and grads[2].abs().sum() > 0   # the gradients are real, not zeros


def test_the_bf16_input_is_not_cast_up_under_autocast():
    # the saving itself: no fp32 copy of the (B, T, in) activations is made for the branch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    dk.attach(model, dk.LoraConfig(r=4, targets=("0",)))
    x = torch.randn(2, 7, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
             and list(e.input_shapes[0]) == [2, 7, 24]]
    assert casts == []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile(record_shapes=True) as prof:
        model(x.float())                  # an fp32 input is cast down (by autocast) once per matmul: seen
    assert any(e.name == "aten::_to_copy" and e.input_shapes and list(e.input_shapes[0]) == [2, 7, 24]
               for e in prof.events())
