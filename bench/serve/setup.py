"""SmolLM2 and its random LoRA adapters for the serving benchmark, saved like real ones.

Every adapter is LoRA on all 7 linears of every block (q, k, v, o, gate, up, down: 210 layers),
rank cycling 32, 8, 64, 16 (so ``a0``, the single-adapter run's, has rank 32, near the mix's mean
of 30), alpha = 2 r, factors drawn from a generator seeded by the adapter's index: ``A`` ~
N(0, 1/in), ``B`` ~ N(0, 0.02^2 / r), which changes the answers without wrecking them. They are
saved under ``runs/bench_serve/adapters/a<k>`` (gitignored) with ``deltakit.save_adapter`` and
served from there through the server's residency, as ``--adapter a<k>=DIR`` would; a rerun with
the same settings reuses them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

RANKS = (32, 8, 64, 16)
TARGETS = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
N_LAYERS = 210            # 30 blocks x 7 linears (checked)


def rank_of(k: int) -> int:
    return RANKS[k % len(RANKS)]


def _randomize(adapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, d in adapter.deltas():
            r, n_in = d.lora_A.shape
            d.lora_A.copy_(torch.randn(d.lora_A.shape, generator=g) / n_in ** 0.5)
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.02 / r ** 0.5)


def make_adapters(model, root: Path, n: int, seed: int, log) -> dict[str, Path]:
    """``a0 .. a<n-1>`` saved under ``root`` (kept when ``root/settings.json`` matches)."""
    import deltakit as dk

    settings = {"ranks": list(RANKS), "targets": TARGETS, "seed": seed, "init": "A~N(0,1/in), B~N(0,4e-4/r)"}
    stamp = root / "settings.json"
    old = json.loads(stamp.read_text()) if stamp.is_file() else None
    paths = {f"a{k}": root / f"a{k}" for k in range(n)}
    todo = [k for k in range(n) if old != settings or not (paths[f"a{k}"] / "adapter.json").is_file()]
    for k in todo:
        r = rank_of(k)
        ad = dk.attach(model, dk.LoraConfig(r=r, alpha=2.0 * r, targets=("re:" + TARGETS,)), name=f"a{k}")
        count = sum(1 for _ in ad.deltas())
        if count != N_LAYERS:
            raise RuntimeError(f"expected LoRA on {N_LAYERS} SmolLM2 linears, found {count}")
        _randomize(ad, seed * 100_000 + k)
        dk.save_adapter(ad, paths[f"a{k}"])
        dk.detach(model, f"a{k}")
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(settings))
        log(f"saved {len(todo)} adapters under {root}")
    return paths


def param_bytes(params) -> int:
    """Bytes of distinct tensors (a tied embedding / LM head counted once)."""
    seen, total = set(), 0
    for p in params:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def prompts(tok, n: int, seed: int, lo: int = 8, hi: int = 32) -> list[list[int]]:
    """``n`` prompts of ``lo``-``hi`` tokens: windows of a fixed English text (seeded)."""
    ids = tok(TEXT)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        start = int(torch.randint(0, len(ids) - length, (1,), generator=g))
        out.append(list(ids[start:start + length]))
    return out


def traffic(n_requests: int, n_adapters: int) -> list[str]:
    """Request ``i`` names adapter ``a<i mod n_adapters>``: every adapter appears once the count
    reaches ``n_adapters``, and any ``n_adapters`` consecutive requests are all distinct."""
    return [f"a{i % n_adapters}" for i in range(n_requests)]


TEXT = (
    "The river town woke slowly. Fishermen checked their nets while the baker pulled the first loaves "
    "from the oven, and the smell drifted down to the harbour where the ferry waited. Children ran past "
    "the library, which had been a customs house two centuries ago, and the old clock above its door "
    "still ran four minutes late. In the spring the council argued about a new bridge: engineers said "
    "the stone piers could carry trucks, farmers wanted a wider road for their machines, and the "
    "shopkeepers feared that traffic would pass the town by. A teacher proposed a survey of how people "
    "actually crossed the river each day, how long they waited, and what they carried. The answers "
    "surprised everyone. Most trips were short, made on foot or by bicycle, and happened before nine in "
    "the morning or after five in the evening. The ferry, slow as it was, served them well enough, but "
    "in winter storms it stopped for days. So the council chose a narrow bridge for walkers and cyclists, "
    "kept the ferry for cars, and spent the rest of the money on the school's leaking roof. Explain what "
    "the survey measured, why the result surprised the town, and whether the decision was a good one."
)
