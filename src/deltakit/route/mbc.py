"""MBC: model-based clustering of a library, one merged adapter per cluster, Arrow among them.

Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs",
https://arxiv.org/abs/2405.11157: tasks are grouped by the similarity of their adapters'
parameters (cosine of the flattened LoRA weights) with K-means, one adapter serves each
cluster, and inputs are routed among the cluster adapters with Arrow.

What we do, step by step, and where we differ:

- *Similarity*: the cosine of the whole parameter-space deltas ``dW`` (not of the concatenated
  ``A`` and ``B``, which a change of basis ``B M, M^-1 A`` alters without changing the adapter).
  By default from the library's stored 64-number sketch (``lib.routing(ref)["embedding"]``,
  whose inner products approximate ``<dW_a, dW_b>``: nothing is loaded); ``exact=True`` computes
  ``<dW_a, dW_b>`` from the factors (``s_a s_b sum((B_a^T B_b) * (A_a A_b^T))`` for the LoRA
  family, dense otherwise), for small libraries.
- *K-means*: spherical (cosine) K-means with k-means++ seeding, a few seeded restarts, in torch
  (scikit-learn is not a runtime dependency). The points are the rows of ``V sqrt(L)`` from the
  eigendecomposition of the N x N cosine matrix, whose inner products are exactly the cosines,
  so the sketch and the exact path share one algorithm. Labels are numbered in order of first
  appearance (cluster 0 holds the first entry), so a seed gives the same table every time.
- *One adapter per cluster*: the paper trains a new LoRA on the union of the cluster's data; we
  merge the members instead (the merge engine's uniform average, ``linear``, of their ``dW``;
  any ``merge_task_vectors`` method can be named) and store the result as a LoRA of rank = the
  sum of the members' ranks, which is exact (the average of K rank-r updates has rank <= K r).
  The factors come from the members' row spaces, ``B = dW Q``, ``A = Q^T`` with ``Q`` an
  orthonormal basis of the stacked ``A_i`` rows (exact for any linear merge, checked per layer);
  a merge that leaves that space (TIES, ...) or a ``rank`` cap falls back to a truncated SVD.
  (A full SVD per layer cost 0.3 s x 210 layers per cluster on SmolLM2; this costs milliseconds.)
  ``train_fn(cluster, members, merged_dir) -> adapter dir`` is a hook to train instead (e.g.
  starting from the merged adapter); whatever it returns is what enters the library.
  Each cluster adapter enters the library with lineage ``(member, "merge")`` and tag ``"mbc"``.
- *Routing*: :class:`MBC` is Arrow (:mod:`.arrow`) over the cluster adapters' stored prototypes.

>>> cl = cluster_library(lib, 3, seed=0)                                     # doctest: +SKIP
>>> print(cl.table())                                                        # doctest: +SKIP
>>> entries = build_cluster_adapters(lib, cl, base_model)                   # doctest: +SKIP
>>> router = MBC.from_library(lib, base_model, [e.ref for e in entries], top_k=1)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..compress.export import svd_factors
from ..core.adapter import adapters, attach, detach
from ..core.seeding import generator
from ..io.adapter_files import save_adapter
from ..merge import merge_task_vectors
from ..methods.lora import LoraConfig
from ..taskvec import LowRank, TaskVector
from ._base import Router, RoutingError, register_router

__all__ = ["MBC", "Clustering", "MergedCluster", "kmeans", "cosine_matrix", "cluster_library", "merge_members",
           "write_cluster_lora", "build_cluster_adapters", "clusterable_refs", "TAG"]

TAG = "mbc"
_TMP = "__deltakit_mbc__"
TrainFn = Callable[[int, Sequence[Any], Path], "str | Path"]


# ---------------------------------------------------------------- k-means (pure)
def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _plus_plus(x: Tensor, c: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding on unit rows ``x`` (N, D) with distance ``1 - cos``: (c, D) centres."""
    first = int(torch.randint(x.shape[0], (1,), generator=g))
    centres = [x[first]]
    for _ in range(1, c):
        d = (1 - x @ torch.stack(centres).T).clamp_min(0).min(dim=1).values  # (N,)
        if float(d.sum()) <= 0:  # every point sits on a centre: any point will do
            i = int(torch.randint(x.shape[0], (1,), generator=g))
        else:
            i = int(torch.multinomial(d ** 2, 1, generator=g))
        centres.append(x[i])
    return torch.stack(centres)


def _lloyd(x: Tensor, centres: Tensor, iters: int) -> tuple[Tensor, float]:
    """Spherical Lloyd iterations -> (labels (N,), sum of (1 - cos) to the assigned centre)."""
    labels = torch.full((x.shape[0],), -1, dtype=torch.long)
    for _ in range(iters):
        new = (x @ centres.T).argmax(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for k in range(centres.shape[0]):
            if bool((labels == k).any()):  # an emptied cluster keeps its old centre
                centres[k] = _normalise(x[labels == k].sum(0, keepdim=True))[0]
    cost = float((1 - (x * centres[labels]).sum(1)).sum())
    return labels, cost


def _canonical(labels: Tensor) -> Tensor:
    """Renumber clusters in order of first appearance (cluster 0 holds point 0)."""
    order = list(dict.fromkeys(labels.tolist()))
    return torch.tensor([order.index(v) for v in labels.tolist()], dtype=torch.long)


def kmeans(x: Tensor, c: int, *, seed: int = 0, n_init: int = 10, iters: int = 100) -> Tensor:
    """Spherical K-means of the rows of ``x`` (N, D) into ``c`` clusters -> labels (N,), the
    best of ``n_init`` seeded k-means++ starts (lowest sum of ``1 - cos``)."""
    if x.dim() != 2 or not 1 <= c <= x.shape[0]:
        raise RoutingError(f"kmeans: expected (N, D) points and 1 <= clusters <= N, found {tuple(x.shape)} "
                           f"and {c} clusters")
    x = _normalise(x.double())
    g = generator(seed, "mbc.kmeans")
    best, best_cost = None, math.inf
    for _ in range(n_init):
        labels, cost = _lloyd(x, _plus_plus(x, c, g), iters)
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return _canonical(best)


def _points(cos: Tensor) -> Tensor:
    """Rows whose inner products are the (PSD-clipped) cosine matrix ``cos`` (N, N)."""
    vals, vecs = torch.linalg.eigh(cos.double())
    return vecs * vals.clamp_min(0).sqrt()


# ---------------------------------------------------------------- similarity of library entries
def _dot(a: LowRank | Tensor, b: LowRank | Tensor) -> float:
    """``<dW_a, dW_b>``; two LowRank values without forming either ``dW``."""
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        gb = a.B.double().T @ b.B.double()  # (r_a, r_b)
        ga = a.A.double() @ b.A.double().T  # (r_a, r_b)
        return a.scale * b.scale * float((gb * ga).sum())
    da = a.to_dense() if isinstance(a, LowRank) else a
    db = b.to_dense() if isinstance(b, LowRank) else b
    return float((da.double().reshape(-1) * db.double().reshape(-1)).sum())


def _task_vector(lib, model: nn.Module, ref: str) -> TaskVector:
    """Entry ``ref``'s deltas (LoRA family factored; heads left out), ``model`` left as it was."""
    adapter = lib.load(model, ref, name=_TMP, activate=False, trainable=False)
    try:
        return TaskVector.from_adapter(adapter, include_full=False)
    finally:
        detach(model, _TMP)


def _gram(tvs: Sequence[TaskVector]) -> Tensor:
    n = len(tvs)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            common = [k for k in tvs[i].keys() if k in tvs[j]]
            g[i, j] = g[j, i] = sum(_dot(tvs[i].get(k), tvs[j].get(k)) for k in common)
    return g


def cosine_matrix(lib, refs: Sequence[str], *, exact: bool = False, model: nn.Module | None = None) -> Tensor:
    """(N, N) cosines of the entries' ``dW``: from the stored sketches, or ``exact`` from the
    factors (needs the base ``model`` to load them). A zero delta has cosine 0 with everything."""
    if exact:
        if model is None:
            raise RoutingError("mbc: exact cosines load the adapters; expected the base model, found none")
        g = _gram([_task_vector(lib, model, r) for r in refs])
        norms = g.diagonal().clamp_min(0).sqrt()
        return g / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    e = _normalise(torch.stack([lib.routing(r)["embedding"].double() for r in refs]))
    return e @ e.T


@dataclass(frozen=True)
class Clustering:
    """``labels[i]``: the cluster of library entry ``refs[i]``; ``cosine`` (N, N) between entries."""

    refs: tuple[str, ...]
    labels: tuple[int, ...]
    cosine: Tensor
    exact: bool = False

    @property
    def n_clusters(self) -> int:
        return max(self.labels) + 1

    def members(self, k: int) -> list[str]:
        return [r for r, lab in zip(self.refs, self.labels) if lab == k]

    def _idx(self, k: int) -> list[int]:
        return [i for i, lab in enumerate(self.labels) if lab == k]

    def within(self, k: int) -> float | None:
        """Mean cosine over the cluster's pairs (None for a single member)."""
        idx = self._idx(k)
        pairs = [float(self.cosine[i, j]) for a, i in enumerate(idx) for j in idx[a + 1:]]
        return sum(pairs) / len(pairs) if pairs else None

    def between(self, k: int, j: int) -> float:
        """Mean cosine between the members of clusters ``k`` and ``j``."""
        return float(self.cosine[self._idx(k)][:, self._idx(j)].mean())

    def rows(self) -> list[dict]:
        """One row per cluster: members, mean cosine within, and the most similar other cluster."""
        out = []
        for k in range(self.n_clusters):
            others = {j: self.between(k, j) for j in range(self.n_clusters) if j != k}
            near = max(others, key=others.get) if others else None
            w = self.within(k)
            out.append({"cluster": k, "size": len(self._idx(k)), "members": ", ".join(self.members(k)),
                        "cos within": "-" if w is None else f"{w:.3f}",
                        "cos between (nearest)": "-" if near is None else f"{others[near]:.3f} (cluster {near})"})
        return out

    def table(self) -> str:
        from .._fmt import table
        return table(self.rows(), ["cluster", "size", "members", "cos within", "cos between (nearest)"])


def cluster_library(lib, clusters: int, *, refs: Sequence[str] | None = None, seed: int = 0, exact: bool = False,
                    model: nn.Module | None = None, n_init: int = 10) -> Clustering:
    """K-means of the library's entries (``refs``, default: every entry's newest version not
    itself an MBC adapter) into ``clusters`` groups by the cosine of their ``dW``."""
    refs = list(refs) if refs is not None else clusterable_refs(lib)
    if not 1 <= clusters <= len(refs):
        raise RoutingError(f"mbc: expected 1 <= clusters <= {len(refs)} (the entries to cluster), found {clusters}")
    cos = cosine_matrix(lib, refs, exact=exact, model=model)
    labels = kmeans(_points(cos), clusters, seed=seed, n_init=n_init)
    return Clustering(tuple(refs), tuple(labels.tolist()), cos.float(), exact)


def clusterable_refs(lib) -> list[str]:
    """What ``cluster_library`` clusters by default: each name's newest entry, MBC adapters left out."""
    newest = {e.name: e for e in lib.list()}  # by name then version: the last one is the newest
    return [e.ref for e in newest.values() if TAG not in e.tags]


# ---------------------------------------------------------------- one merged adapter per cluster
def _rank(v: LowRank | Tensor) -> int:
    return v.B.shape[1] if isinstance(v, LowRank) else min(v.shape[0], v[0].numel() if v.dim() > 1 else 1)


def _padded(tvs: Sequence[TaskVector]) -> list[TaskVector]:
    """Every task vector over the union of names; an entry a member lacks is a zero delta there
    (the merge engine merges only names every input has)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for tv in tvs:
        for n in tv.keys():
            shapes.setdefault(n, tv.shape(n))
    return [tv + TaskVector.from_mapping({n: torch.zeros(s) for n, s in shapes.items() if n not in tv})
            if any(n not in tv for n in shapes) else tv for tv in tvs]


@dataclass(frozen=True)
class MergedCluster:
    """A cluster's members merged: ``delta`` the merged ``dW`` (lazy), ``ranks`` per parameter the
    rank that stores it exactly (the sum of the members' ranks, capped by the matrix), ``bases``
    per parameter an orthonormal basis (in, R) of the members' LoRA row spaces (None where a
    member's delta is dense): a linear merge's rows lie in it, so ``dW = (dW Q) Q^T`` exactly."""

    delta: TaskVector
    ranks: dict[str, int]
    bases: dict[str, Tensor | None]

    @property
    def rank(self) -> int:
        return max(self.ranks.values())


def _row_bases(tvs: Sequence[TaskVector]) -> dict[str, Tensor | None]:
    rows: dict[str, list[Tensor] | None] = {}
    for tv in tvs:
        for n, v in tv.items():
            if not isinstance(v, LowRank) or rows.get(n, []) is None:
                rows[n] = None
            else:
                rows.setdefault(n, []).append(v.A.double())
    return {n: None if a is None else torch.linalg.qr(torch.cat(a).T)[0] for n, a in rows.items()}


def merge_members(lib, refs: Sequence[str], model: nn.Module, *, method: str = "linear",
                  config: Any = None) -> MergedCluster:
    """The entries ``refs`` merged by the merge engine's ``method`` (default ``linear``: the
    uniform average of their ``dW``; a member without a layer counts as zero there)."""
    tvs = [_task_vector(lib, model, r) for r in refs]
    ranks: dict[str, int] = {}
    for tv in tvs:
        for n, v in tv.items():
            ranks[n] = min(ranks.get(n, 0) + _rank(v), v.shape[0], math.prod(v.shape[1:]) or 1)
    return MergedCluster(merge_task_vectors(method, _padded(tvs), config), ranks, _row_bases(tvs))


def _factor(dw: Tensor, basis: Tensor | None, rank: int, truncate: bool) -> tuple[Tensor, Tensor]:
    """``(B (out, r), A (r, in))`` with ``B @ A = dW`` (reshaped to a matrix): through the members'
    row basis when that is exact (any linear merge: two thin matmuls), else a truncated SVD."""
    mat = dw.reshape(dw.shape[0], -1).double()
    if basis is not None and not truncate:
        B = mat @ basis
        if float((mat - B @ basis.T).norm()) <= 1e-6 * float(mat.norm()):
            return B.float(), basis.T.float()
    B, A, _ = svd_factors(mat, rank=rank)
    return B.float(), A.float()


def _module(param: str) -> str:
    if not param.endswith(".weight"):
        raise RoutingError(f"mbc: a cluster adapter is a LoRA, which holds weights only; found {param!r}")
    return param[: -len(".weight")]


def write_cluster_lora(merged: MergedCluster, model: nn.Module, out: Path, *, name: str,
                       rank: int | None = None) -> Path:
    """Save ``merged`` as a deltakit LoRA directory at ``out`` (``alpha = r``: scale 1; layers of a
    smaller rank zero-padded to the largest). Exact unless ``rank`` truncates (SVD)."""
    factors = {_module(n): _factor(merged.delta.dense(n), merged.bases.get(n), rank or merged.ranks[n], rank is not None)
               for n in merged.delta.keys()}
    r = max(B.shape[1] for B, _ in factors.values())
    tmp = name if name not in adapters(model) else _TMP
    with torch.random.fork_rng(devices=[]):  # LoRA's init draws are overwritten: keep the caller's RNG
        ad = attach(model, LoraConfig(r=r, alpha=float(r), targets=tuple(factors)), name=tmp, activate=False)
    try:
        with torch.no_grad():
            for path, d in ad.deltas():
                B, A = factors[path]
                Bv, Av, _, _ = d.factors()  # views of lora_B / lora_A in the matrix layout
                Bv.zero_()
                Av.zero_()
                Bv[:, : B.shape[1]].copy_(B)
                Av[: A.shape[0]].copy_(A)
        return save_adapter(ad, out)
    finally:
        detach(model, tmp)


def build_cluster_adapters(lib, clustering: Clustering, model: nn.Module, *, prefix: str = TAG,
                           method: str = "linear", config: Any = None, rank: int | None = None,
                           train_fn: TrainFn | None = None, tags: Sequence[str] = (TAG,)) -> list:
    """Add one adapter per cluster to ``lib`` as ``{prefix}-{k}``: its members merged (exact, or
    SVD-truncated to ``rank``), or what ``train_fn(k, member entries, merged dir)`` returns;
    lineage ``(member, "merge")``. Returns the new entries in order."""
    out = []
    for k in tqdm(range(clustering.n_clusters), desc="mbc: cluster adapters", disable=not sys.stderr.isatty()):
        members = clustering.members(k)
        merged = merge_members(lib, members, model, method=method, config=config)
        with tempfile.TemporaryDirectory(prefix="deltakit-mbc-") as tmp:
            path: str | Path = write_cluster_lora(merged, model, Path(tmp) / f"{prefix}-{k}", name=f"{prefix}-{k}",
                                                  rank=rank)
            if train_fn is not None:
                path = train_fn(k, [lib.get(m) for m in members], Path(path))
            out.append(lib.add(path, model=model, name=f"{prefix}-{k}", tags=tags,
                               description=f"MBC cluster {k} of {clustering.n_clusters}: {', '.join(members)}",
                               lineage=[(m, "merge") for m in members]))
    return out


# ---------------------------------------------------------------- the router
@register_router("mbc")
@dataclass
class MBC(Router):
    """Arrow over the cluster adapters (``names``: as attached; ``clusters``: their library refs).

    Build with :meth:`from_library`; ``weights_for`` and ``scope`` are Arrow's.
    """

    arrow: Router | None = field(default=None, repr=False)
    clusters: tuple[str, ...] = ()

    @classmethod
    def from_library(cls, lib, model: nn.Module, refs: Sequence[str] | None = None, *, top_k: int = 1,
                     temperature: float = 1.0) -> MBC:
        """Arrow over the cluster adapters ``refs`` (default: the newest entry of every name tagged
        ``mbc``), attached to ``model`` under Arrow's names unless already there. (``model`` comes
        before ``refs`` here, unlike Arrow's, because ``refs`` has a default; the bench calls it so.)"""
        refs = list(refs) if refs is not None else [e.ref for e in {e.name: e for e in lib.list(tag=TAG)}.values()]
        if not refs:
            raise RoutingError(f"mbc: expected cluster adapters (entries tagged {TAG!r}) in {lib.root}, found none; "
                               "run 'deltakit library cluster' first")
        from .arrow import Arrow  # its own helper's file; imported here so MBC's clustering works without it

        arrow = Arrow.from_library(lib, refs, model, top_k=top_k, temperature=temperature)
        attached = adapters(model)
        for name, ref in zip(arrow.names, refs):  # Arrow's names follow refs' order
            if name not in attached:
                lib.load(model, ref, name=name, activate=False, trainable=False)
        return cls(names=tuple(arrow.names), arrow=arrow, clusters=tuple(refs))

    def describe(self) -> str:
        return f"mbc: Arrow over {len(self.clusters)} cluster adapters ({', '.join(self.clusters)})"

    def _arrow(self) -> Router:
        if self.arrow is None:
            raise RoutingError("mbc: no Arrow router over the cluster adapters; build it with MBC.from_library")
        return self.arrow

    def weights_for(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor | Callable:
        return self._arrow().weights_for(model, batch)

    @contextlib.contextmanager
    def scope(self, model: nn.Module, batch: Mapping[str, Any]) -> Iterator[None]:
        arrow = self._arrow()
        try:
            with arrow.scope(model, batch):
                yield
        finally:
            self.decisions = arrow.decisions
