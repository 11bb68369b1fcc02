"""``deltakit library --root DIR add|list|show|remove|verify|cluster``: the adapter library from the shell."""
from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_parser"]

REF_HELP = "NAME (its newest version) or NAME@VERSION"


def add_parser(sub) -> None:
    p = sub.add_parser("library", help="a library of adapters: add, list, show, remove, verify, cluster",
                       description="A directory-backed, content-addressed store of adapters with a SQLite index "
                                   "and routing data (Arrow prototypes, a clustering embedding) computed when an "
                                   "adapter is added. Example: deltakit library --root lib add runs/sst2 --task sst2")
    p.add_argument("--root", required=True, help="the library directory (created by the first add)")
    ops = p.add_subparsers(dest="op", metavar="OPERATION", required=True)
    _add_add(ops)
    _add_list(ops)
    s = ops.add_parser("show", help="one entry: metadata, lineage, layers and prototype shapes",
                       description="Show one entry: its metadata, lineage, targets and routing data shapes.")
    s.add_argument("ref", metavar="REF", help=REF_HELP)
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=run_show)
    r = ops.add_parser("remove", help="remove an entry, its files (unless shared) and its routing data",
                       description="Remove one entry; its object and routing files go too unless another "
                                   "entry stores the same content. Run 'verify' afterwards to prove the rest intact.")
    r.add_argument("ref", metavar="REF", help=REF_HELP)
    r.set_defaults(func=run_remove)
    v = ops.add_parser("verify", help="re-hash every stored file; exit 1 if anything is missing, corrupt or unused",
                       description="Re-hash every stored file against the index and look for files no entry "
                                   "uses (debris of a crashed add or remove). Exits 1 when anything is wrong.")
    v.add_argument("--clean", action="store_true", help="remove unused files (missing / corrupt ones are only reported)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=run_verify)
    _add_cluster(ops)


def _add_add(ops) -> None:
    a = ops.add_parser("add", help="add a deltakit or peft adapter directory",
                       description="Add an adapter directory (deltakit's, or a Hugging Face peft one). Its base "
                                   "model is loaded (--model, else the base its manifest / peft config records) to "
                                   "check the base and compute the routing data; an adapter for another base than "
                                   "the library's is refused.")
    a.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (adapter.json or adapter_config.json)")
    a.add_argument("--model", default=None, help="base model directory, hub id or 'minilm' (default: the recorded one)")
    a.add_argument("--name", default=None, help="entry name (default: the adapter's name, else the directory's)")
    a.add_argument("--version", type=int, default=None, help="entry version (default: the newest of NAME + 1)")
    a.add_argument("--task", default=None, help="the task the adapter solves")
    a.add_argument("--description", default=None, help="free text (retrieval routing may match on it)")
    a.add_argument("--tag", action="append", default=[], help="a tag, repeatable")
    a.add_argument("--group", action="append", default=[], help="an access group that may use it, repeatable")
    a.add_argument("--parent", action="append", default=[], metavar="REF:HOW",
                   help="lineage, repeatable: the entry this one came from and how, e.g. sst2@1:merge")
    a.set_defaults(func=run_add)


def _add_list(ops) -> None:
    ls = ops.add_parser("list", help="list entries, filtered", description="List entries matching every filter given.")
    for flag, what in (("name", "entry name"), ("task", "task"), ("tag", "tag"), ("group", "access group"),
                       ("method", "PEFT method")):
        ls.add_argument(f"--{flag}", default=None, help=f"only entries with this {what}")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=run_list)


def _add_cluster(ops) -> None:
    c = ops.add_parser("cluster", help="MBC: cluster the entries by adapter similarity, add one merged adapter per cluster",
                       description="Model-based clustering (Ostapenko et al. 2024): spherical K-means of the entries "
                                   "by the cosine of their weight deltas (from the stored sketches, or --exact from "
                                   "the factors), then one adapter per cluster, the uniform average of its members "
                                   "(the paper retrains one per cluster instead), added as PREFIX-K with tag 'mbc' "
                                   "and lineage 'merge'. Route among them with --router mbc. Example: deltakit "
                                   "library --root lib cluster --clusters 3 --dry-run")
    c.add_argument("--clusters", type=int, required=True, metavar="C", help="number of clusters")
    c.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    c.add_argument("--model", "--base", dest="model", default=None,
                   help="base model directory, hub id or 'minilm' (default: the one the entries record)")
    c.add_argument("--exact", action="store_true", help="exact cosines from the adapters' factors (loads every "
                                                        "adapter; default: the stored 64-number sketches)")
    c.add_argument("--method", default="linear", help="merge method for each cluster (default linear: the average)")
    c.add_argument("--rank", type=int, default=None, help="store each merged adapter at this rank (SVD-truncated); "
                                                          "default: the exact rank, the sum of its members' ranks")
    c.add_argument("--prefix", default="mbc", help="entry names PREFIX-0, PREFIX-1, ... (default mbc)")
    c.add_argument("--dry-run", action="store_true", help="only show the clusters; add nothing")
    c.set_defaults(func=run_cluster)


def _library(args, create: bool = False):
    """The library at --root; only ``add`` creates one (a mistyped root should not look empty)."""
    from ..library import AdapterLibrary
    if not create and not (Path(args.root) / "library.sqlite").is_file():
        raise FileNotFoundError(f"expected a library at {args.root} (library.sqlite), found nothing; "
                                "'deltakit library --root DIR add ...' creates one")
    return AdapterLibrary(args.root)


def _parents(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        ref, sep, how = s.rpartition(":")
        if not sep or not ref or not how:
            raise ValueError(f"--parent: expected REF:HOW (e.g. sst2@1:merge), found {s!r}")
        out.append((ref, how))
    return out


def _base_model(adapter: Path, model: str | None):
    """The base to add ``adapter`` with: --model, else what its manifest or peft config records."""
    from ..io.adapter_files import MANIFEST, read_manifest
    if (adapter / MANIFEST).is_file():
        from ..io.models import load_base_for
        return load_base_for(read_manifest(adapter), model)[0]
    from .peft_cmd import load_peft_base
    return load_peft_base(adapter, model)


def run_add(args) -> int:
    lib = _library(args, create=True)
    parents = _parents(args.parent)
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"expected an adapter directory at {adapter}, found {'a file' if adapter.exists() else 'nothing'}")
    e = lib.add(adapter, model=_base_model(adapter, args.model), name=args.name, version=args.version,
                task=args.task, description=args.description, tags=args.tag, groups=args.group, lineage=parents)
    n = sum(k.startswith("prototype.") for k in lib.routing(e.ref))
    print(f"added {e.ref} ({e.method}, sha256 {e.sha256[:12]}, {n} prototypes) to {lib.root}")
    return 0


def _row(e) -> dict:
    return {"ref": e.ref, "id": e.id, "name": e.name, "version": e.version, "method": e.method, "task": e.task,
            "description": e.description, "tags": list(e.tags), "groups": list(e.groups),
            "lineage": [{"parent": p, "how": h} for p, h in e.lineage], "size": e.size, "sha256": e.sha256,
            "routing_sha256": e.routing_sha256, "base_fingerprint": e.base_fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.created)), "path": str(e.path)}


def run_list(args) -> int:
    entries = _library(args).list(name=args.name, task=args.task, tag=args.tag, group=args.group, method=args.method)
    rows = [_row(e) for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from .._fmt import table
    shown = [{**r, "task": r["task"] or "", "tags": ",".join(r["tags"]), "groups": ",".join(r["groups"]),
              "sha256": r["sha256"][:12]} for r in rows]
    print(table(shown, ["ref", "method", "task", "tags", "groups", "size", "sha256", "created"]) if rows
          else "no entries")
    return 0


def run_show(args) -> int:
    lib = _library(args)
    e = lib.get(args.ref)
    routing = lib.routing(e.ref)
    row = {**_row(e), "targets": {p: t.get("method") for p, t in e.manifest["targets"].items()},
           "config": e.manifest["config"],
           "prototypes": {k.removeprefix("prototype."): list(v.shape) for k, v in routing.items() if k != "embedding"},
           "embedding": list(routing["embedding"].shape)}
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    for k in ("ref", "id", "method", "task", "description", "tags", "groups", "lineage", "size", "sha256",
              "routing_sha256", "base_fingerprint", "created", "path", "config", "embedding"):
        print(f"{k}: {row[k]}")
    print("layers (target: method, prototype shape):")
    for p, m in row["targets"].items():
        print(f"  {p}: {m}, {row['prototypes'].get(p, 'no prototype')}")
    return 0


def run_remove(args) -> int:
    e = _library(args).remove(args.ref)
    print(f"removed {e.ref} (sha256 {e.sha256[:12]}); run 'deltakit library --root {args.root} verify' to check the rest")
    return 0


def run_verify(args) -> int:
    report = _library(args).verify(clean=args.clean)
    if args.json:
        print(json.dumps({"ok": report.ok, **{k: getattr(report, k) for k in
                                              ("checked", "missing", "corrupt", "orphans", "cleaned")}}, indent=2))
        return 0 if report.ok else 1
    for kind in ("missing", "corrupt", "orphans", "cleaned"):
        for line in getattr(report, kind):
            print(f"{kind}: {line}")
    print(f"{'ok' if report.ok else 'FAILED'}: {report.checked} entries checked")
    return 0 if report.ok else 1



def _entries_base(lib, refs: list[str], model: str | None):
    """The base model the library's entries were trained on (--model, else the first entry's record)."""
    from ..io.models import load_base_for
    return load_base_for(lib.get(refs[0]).manifest, model)[0]


def run_cluster(args) -> int:
    from ..route.mbc import build_cluster_adapters, cluster_library, clusterable_refs
    lib = _library(args)
    refs = clusterable_refs(lib)
    if not refs:
        raise ValueError(f"expected entries to cluster in {lib.root}, found none (MBC adapters are not clustered)")
    if args.clusters < 1 or args.clusters > len(refs):
        raise ValueError(f"--clusters: expected 1..{len(refs)} (the entries to cluster), found {args.clusters}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank: expected a positive integer, found {args.rank}")
    need_base = args.exact or not args.dry_run
    base = _entries_base(lib, refs, args.model) if need_base else None
    cl = cluster_library(lib, args.clusters, refs=refs, seed=args.seed, exact=args.exact, model=base)
    print(f"{len(refs)} entries in {cl.n_clusters} clusters (cosine of dW, {'exact' if cl.exact else 'sketch'}, "
          f"seed {args.seed}):")
    print(cl.table())
    if args.dry_run:
        print("dry run: nothing added")
        return 0
    entries = build_cluster_adapters(lib, cl, base, prefix=args.prefix, method=args.method, rank=args.rank)
    for k, e in enumerate(entries):
        members = cl.members(k)
        print(f"added {e.ref} (rank {e.manifest['config']['r']}, merged from {len(members)}: {', '.join(members)})")
    return 0
