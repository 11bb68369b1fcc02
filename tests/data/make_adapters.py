"""Writes the frozen adapter files under ``tests/data/adapters/`` (run ONCE, then never again).

These files were written by deltakit 0.1.0 at commit fbfea24 (before the seeded-RNG
helper was unified) and are the promise that adapters saved by that release load
and give the same outputs forever. Re-writing one would replace the promise with
whatever the code does today, so the script only writes cases that are missing (run
it against the release a new case should pin, e.g. ``git archive fbfea24 src``):

    PYTHONPATH=src python tests/data/make_adapters.py

Each case is ``<name>/`` (an adapter directory as ``save_adapter`` writes it) plus
``<name>.expected.safetensors`` (``y``: the model's output on ``x`` with the adapter
attached). ``base.safetensors`` holds the base weights and the input ``x``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import deltakit as dk

OUT = Path(__file__).parent / "adapters"


def base_model() -> nn.Sequential:
    """The fixed base: three Linear layers (sizes chosen so every method's divisibility holds)."""
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))


T = ["0", "2", "4"]
CASES: dict[str, tuple[str, dict]] = {
    # load regenerates frozen random tensors from the config's seed
    "vera": ("vera", dict(r=8, seed=7)),
    "nola": ("nola", dict(r=4, num_basis_A=8, num_basis_B=8, seed=5)),
    "mos": ("mos", dict(r=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, seed=3)),
    "intrinsic_dense": ("intrinsic", dict(projection="dense", seed=11)),
    "intrinsic_fastfood": ("intrinsic", dict(projection="fastfood", seed=12)),
    "sparse_random": ("sparse_random", dict(seed=13)),
    "lora_fa": ("lora_fa", dict(r=4, seed=17)),
    "lora_fa_gaussian": ("lora_fa", dict(r=4, seed=18, init="gaussian")),
    "tied_lora": ("tied_lora", dict(r=4, seed=19)),
    "tied_lora_frozen": ("tied_lora", dict(r=4, seed=20, trainable=("u", "v"))),
    # the offset is re-derived at load by a randomized SVD
    "pissa_lowrank": ("pissa", dict(r=2, svd_niter=2)),
    # stored in full (a baseline for the file format itself)
    "lora": ("lora", dict(r=2)),
    "vb_lora": ("vb_lora", dict(r=2, num_vectors=8, vector_length=4, topk=2)),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = base_model().eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    if not (OUT / "base.safetensors").exists():
        save_file({**{k: v.contiguous() for k, v in base.state_dict().items()}, "x": x}, OUT / "base.safetensors")
    for case, (method, kw) in CASES.items():
        if (OUT / case).exists():
            continue    # frozen: never overwritten
        model = base_model().eval()
        model.load_state_dict(base.state_dict())
        adapter = dk.attach(model, dk.get_method(method).config(targets=T, **kw), name=case)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in adapter.parameters():
                if p.is_floating_point():
                    p.add_(0.2 * torch.randn(p.shape, generator=g).to(p))
            y = model(x)
        dk.save_adapter(adapter, OUT / case)
        save_file({"y": y.contiguous()}, OUT / f"{case}.expected.safetensors")
        print(case, sum(f.stat().st_size for f in (OUT / case).iterdir()), "bytes")


if __name__ == "__main__":
    main()
