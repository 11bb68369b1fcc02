"""Adapters saved by an earlier release load and give bit-identical outputs.

The files under ``tests/data/adapters/`` were written once (``tests/data/make_adapters.py``,
at commit fbfea24, before the seeded-RNG helper was unified). Several methods regenerate
frozen random tensors from the config's seed at load time (VeRA, NOLA, MoS, intrinsic,
sparse_random, LoRA-FA, Tied-LoRA) or re-derive an offset with a randomized SVD (PiSSA);
a change to how a seed is turned into numbers silently breaks every file saved before.
Never regenerate these files to make this test pass.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltakit as dk
from tests.data.make_adapters import CASES, base_model

DATA = Path(__file__).parents[1] / "data" / "adapters"


def _base() -> tuple[torch.nn.Module, torch.Tensor]:
    state = load_file(DATA / "base.safetensors")
    x = state.pop("x")
    model = base_model().eval()
    model.load_state_dict(state)
    return model, x


def test_every_case_is_committed():
    assert sorted(p.name for p in DATA.iterdir() if p.is_dir()) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_adapter_gives_the_saved_output(case):
    model, x = _base()
    y_base = model(x)
    dk.load_adapter(model, DATA / case)
    expected = load_file(DATA / f"{case}.expected.safetensors")["y"]
    with torch.no_grad():
        y = model(x)
    assert not torch.equal(expected, y_base), "the fixture must differ from the base to prove anything"
    assert torch.equal(y, expected), f"{case}: max |diff| {(y - expected).abs().max().item():.3g}"
