"""MoS: Mixture of Shards for LoRA (Wang et al., 2024) https://arxiv.org/abs/2410.00938

    dW = s * B @ A,  s = alpha / r;  each rank-vector (row of A (r, in), column of B (out, r))
    is the concatenation of ``l`` shards; shards come from global pools shared by all targets

The paper's four differentiation strategies, as implemented here:

* **vector sharding** - a rank-vector of length ``d`` is ``l`` shards of length ``d / l``;
* **subset selection** - each target picks its own subset of shards from the global
  pool through a fixed index matrix (the paper's "MoE-like router": random, not
  trained). The index matrices are regenerated from ``config.seed`` and the target's
  path (non-persistent buffers: NOT in the file); a target draws without replacement,
  starting a fresh permutation of the pool only when it needs more shards than exist;
* **pair dissociation** - A and B have separate pools and independent index matrices,
  so row i of A and column i of B are not tied to one shared pair;
* **shard privatization** - the first ``private_rank`` rank-vectors of each target are
  made of shards only that target owns.

Pools are keyed by shard length (``A_<in/l>``, ``B_<out/l>``), so targets of equal width
share one pool. Budget: each target contributes ``equivalent_rank`` rank-vectors of
trainable parameters (``private_rank`` of them private, the rest to the public pools)
while using ``r >= equivalent_rank`` rank-vectors: trainable = ``sum over targets
equivalent_rank * (in + out)``, the count of a LoRA of rank ``equivalent_rank``.
Init as LoRA: A shards (public and private) U(-1/sqrt(in), 1/sqrt(in)), B shards zero,
so the model starts at the base. Not implemented: the reference code's optional
"random scaling" vectors.

>>> import torch, deltakit as dk
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
>>> cfg = dk.get_method("mos").config(r=4, equivalent_rank=2, private_rank=1, shards_per_vector=2, targets=["0", "1"])
>>> dk.attach(m, cfg).num_parameters()  # 2 targets * 2 * (8 + 8), as a rank-2 LoRA
64
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.delta import BuildContext, param_dtype
from ..core.fields import knob
from ..core.registry import ConfigError, DeltaConfig, register_method
from ..core.seeding import generator
from ._banks import FactoredDelta, layout, linear_shape, target_device
from ._base_ops import Conv1D, in_out

__all__ = ["MosConfig", "MoS", "ShardPools"]


@dataclass(frozen=True)
class MosConfig(DeltaConfig):
    """MoS hyper-parameters."""

    r: int = knob(8, ge=1, log=True, doc="rank each target's A (r, in) and B (out, r) are assembled to")
    equivalent_rank: int = knob(2, ge=1, doc="trainable budget per target, in rank-vectors (LoRA-equivalent rank)")
    private_rank: int = knob(1, ge=0, doc="how many of each target's rank-vectors are private (shard privatization)")
    shards_per_vector: int = knob(
        2, ge=1, doc="``l``, shards concatenated into one rank-vector (vector sharding); must divide every "
                     "target's in and out")
    alpha: float = knob(16.0, gt=0, log=True, doc="scale numerator; dW is multiplied by ``alpha / r``")
    seed: int = knob(0, doc="seed that, with each target's path, regenerates the index matrices (not saved)")

    def validate(self) -> None:
        if self.private_rank > self.equivalent_rank:
            raise ConfigError(f"MosConfig.private_rank: expected an integer in [0, equivalent_rank="
                              f"{self.equivalent_rank}], found {self.private_rank!r}")
        if self.equivalent_rank > self.r:
            raise ConfigError(f"MosConfig.equivalent_rank: expected at most r={self.r}, found {self.equivalent_rank}")
        if self.private_rank == self.equivalent_rank and self.r > self.private_rank:
            raise ConfigError(f"MosConfig: r={self.r} > private_rank needs a public pool; expected "
                              f"equivalent_rank > private_rank, found both {self.private_rank}")


class ShardPools(nn.Module):
    """The global public shard pools, one per (matrix, shard length)."""

    def __init__(self, sizes: dict[str, tuple[int, int, int]], device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.pools = nn.ParameterDict()
        for key, (n, length, fan_in) in sorted(sizes.items()):
            p = torch.zeros(n, length, device=device, dtype=dtype)
            if key.startswith("A"):
                p.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))   # LoRA's A init (kaiming, a=sqrt 5)
            self.pools[key] = nn.Parameter(p)


def _keys(fan_in: int, fan_out: int, l: int) -> tuple[str, str]:
    return f"A_{fan_in // l}", f"B_{fan_out // l}"


def _select(pool_size: int, count: int, g: torch.Generator) -> Tensor:
    """``count`` pool indices: fresh random permutations of the pool, concatenated."""
    reps = -(-count // pool_size)
    return torch.cat([torch.randperm(pool_size, generator=g) for _ in range(reps)])[:count]


@register_method("mos", MosConfig, paper="https://arxiv.org/abs/2410.00938",
                 description="LoRA factors concatenated from global shard pools (subset selection, pair "
                             "dissociation, vector sharding, private shards)")
class MoS(FactoredDelta):
    supported = (nn.Linear, Conv1D)

    @classmethod
    def build_shared(cls, config: MosConfig, targets: Mapping[str, nn.Module]) -> nn.Module:
        l = config.shards_per_vector
        public = (config.equivalent_rank - config.private_rank) * l      # shards each target adds to a pool
        sizes: dict[str, tuple[int, int, int]] = {}
        for name, m in targets.items():
            if not isinstance(m, cls.supported):
                continue
            fan_in, fan_out = in_out(m)
            if fan_in % l or fan_out % l:
                raise ConfigError(f"MoS on {name}: expected shards_per_vector to divide in={fan_in} and "
                                  f"out={fan_out}, found shards_per_vector={l}")
            for key, d in zip(_keys(fan_in, fan_out, l), (fan_in, fan_out)):
                n = sizes.get(key, (0, 0, 0))[0]
                sizes[key] = (n + public, d // l, fan_in)
        first = next(iter(targets.values()))
        return ShardPools(sizes, target_device(targets), param_dtype(first, config.adapter_dtype))

    def __init__(self, base: nn.Module, config: MosConfig, ctx: BuildContext):
        super().__init__()
        fan_in, fan_out = linear_shape(base, "MoS")
        object.__setattr__(self, "_shared", ctx.shared)    # pools live once, on the model
        dev = next(base.parameters()).device
        dtype = param_dtype(base, config.adapter_dtype)
        l, r, p = config.shards_per_vector, config.r, config.private_rank
        self.layout = layout(base)
        self.r, self.fan_in, self.fan_out = r, fan_in, fan_out
        self.key_A, self.key_B = _keys(fan_in, fan_out, l)
        self.scale = config.alpha / r
        bound = 1 / math.sqrt(fan_in)
        self.mos_private_A = nn.Parameter(torch.empty(p * l, fan_in // l, device=dev, dtype=dtype).uniform_(-bound, bound))
        self.mos_private_B = nn.Parameter(torch.zeros(p * l, fan_out // l, device=dev, dtype=dtype))
        n_pub = (r - p) * l
        pools = self._shared.pools
        # pair dissociation: independent index draws for A and B
        for key, name in ((self.key_A, "index_A"), (self.key_B, "index_B")):
            idx = _select(pools[key].shape[0], n_pub, generator(config.seed, ctx.name, name, scheme="joined")) if n_pub else \
                torch.zeros(0, dtype=torch.long)
            self.register_buffer(name, idx.to(dev), persistent=False)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        pools = self._shared.pools
        A = torch.cat([self.mos_private_A, pools[self.key_A][self.index_A]]).reshape(self.r, self.fan_in)
        B = torch.cat([self.mos_private_B, pools[self.key_B][self.index_B]]).reshape(self.r, self.fan_out).t()
        return A, B                                                   # (r, in), (out, r)

    @classmethod
    def contract_config(cls, kind: str) -> MosConfig | None:
        return None if kind == "conv" else MosConfig(r=4, equivalent_rank=2, private_rank=1, shards_per_vector=2)
