"""The one seed -> generator helper: its numbers are pinned forever.

The integers and floats below were computed with the derivations as first released
(before ``deltakit.core.seeding`` existed): ``_path_seed`` of sparse_mask,
``tensor_generator`` of the merge executor, ``derived_seed`` of ``methods/_banks``.
A changed number here means adapters saved earlier no longer load to the same model.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from deltakit.core.seeding import SCHEMES, derive_seed, generator


def _old_path(seed: int, key: str) -> int:          # sparse_mask, intrinsic, seeded_init, DARE
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _old_joined(seed: int, *keys: object) -> int:    # NOLA, MoS (methods/_banks.derived_seed)
    text = "|".join(str(k) for k in (seed, *keys)).encode()
    return (int(seed) * 1_000_003 + zlib.crc32(text)) % (2**63 - 1)


def test_pinned_seeds():
    assert derive_seed(42, "layers.0.q") == 3158610518
    assert derive_seed(-3, "x") == 2360233914
    assert derive_seed(42, "a", 1, scheme="joined") == 1373726219
    assert derive_seed(-3, "x", scheme="joined") == 2285336057
    assert derive_seed(42, scheme="raw") == 42


@pytest.mark.parametrize("scheme,keys,first", [
    ("path", ("layers.0.q",), [0.6273812651634216, 0.6774746775627136, 0.8398058414459229, 0.04477792978286743]),
    ("joined", ("a", 1), [0.3826848268508911, 0.11089634895324707, 0.6276174187660217, 0.7146456241607666]),
    ("raw", (), [0.8822692632675171, 0.9150039553642273, 0.38286375999450684, 0.9593056440353394]),
])
def test_pinned_draws(scheme, keys, first):
    assert torch.rand(4, generator=generator(42, *keys, scheme=scheme)).tolist() == first


@pytest.mark.parametrize("seed", [0, 1, 7, -5, 123456789, 2**40 + 3, 2**62, 2**63 + 11])
@pytest.mark.parametrize("key", ["", "0", "encoder.layer.1.attention.self.query", "A_16", "Bäume"])
def test_schemes_equal_the_released_derivations(seed, key):
    assert derive_seed(seed, key) == _old_path(seed, key)
    assert derive_seed(seed, key, scheme="joined") == _old_joined(seed, key)
    assert derive_seed(seed, key, 3, scheme="joined") == _old_joined(seed, key, 3)


def test_path_scheme_joins_several_keys_with_a_bar():
    assert derive_seed(5, "a", "b") == _old_path(5, "a|b")


def test_bad_scheme_or_keys_for_raw():
    with pytest.raises(ValueError, match="expected one of"):
        derive_seed(1, "k", scheme="v9")
    with pytest.raises(ValueError, match="expected no keys"):
        derive_seed(1, "k", scheme="raw")
    assert SCHEMES == ("path", "joined", "raw")


def test_dare_generator_is_the_path_scheme():
    from deltakit.merge.executor import tensor_generator
    assert tensor_generator(None, "w") is None
    a = torch.rand(5, generator=tensor_generator(42, "layers.0.q"))
    assert a.tolist()[:4] == [0.6273812651634216, 0.6774746775627136, 0.8398058414459229, 0.04477792978286743]


def test_seeded_init_pinned():
    from deltakit.methods._lora_common import seeded_init
    t = seeded_init((2, 3), "kaiming", 7, "0")
    assert t.tolist() == [[-0.0875278189778328, -0.0635613277554512, 0.2999485433101654],
                          [-0.23326309025287628, -0.5405523777008057, -0.07883308827877045]]


@pytest.mark.parametrize("shape,q,niter", [((16, 8), 2, 2), ((8, 16), 3, 0), ((5, 40), 4, 5)])
def test_pissa_lowrank_equals_torch_after_manual_seed_0(shape, q, niter):
    """PiSSA's randomized SVD once ran ``torch.manual_seed(0); torch.svd_lowrank``; its own
    generator must give the same factors bit for bit (the offset is re-derived at load)."""
    from deltakit.methods.pissa import _svd_lowrank
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(A, q=q, niter=niter)
    u, s, vh = _svd_lowrank(A, q, niter)
    assert torch.equal(U, u) and torch.equal(S, s) and torch.equal(V.t(), vh)


def test_pissa_leaves_the_global_rng_alone():
    """Building PiSSA with a randomized SVD neither reads nor reseeds the global RNG."""
    import deltakit as dk
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    torch.manual_seed(123)
    dk.attach(m, dk.get_method("pissa").config(r=2, svd_niter=2, targets=["0"]))
    assert torch.equal(torch.rand(3), expected)

