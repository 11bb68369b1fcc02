"""The library's SQLite index: schema, migrations check, and the queries (no files, no tensors).

WAL mode lets readers run while one writer commits; writers are serialised by the library's
lock file (:mod:`._store`) and every change is one ``BEGIN IMMEDIATE`` transaction, so an
entry and its tags, groups and lineage appear or vanish together.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SCHEMA_VERSION", "Entry", "Index", "LibraryError"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    routing_sha256 TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    method TEXT NOT NULL,
    task TEXT,
    description TEXT,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    manifest TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS entries_sha ON entries (sha256);
CREATE TABLE IF NOT EXISTS tags (
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE, tag TEXT NOT NULL,
    PRIMARY KEY (entry_id, tag));
CREATE TABLE IF NOT EXISTS groups (
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE, grp TEXT NOT NULL,
    PRIMARY KEY (entry_id, grp));
CREATE TABLE IF NOT EXISTS lineage (
    entry_id INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    parent_id INTEGER NOT NULL, how TEXT NOT NULL, PRIMARY KEY (entry_id, parent_id));
"""

_COLUMNS = ("id", "name", "version", "sha256", "routing_sha256", "base_fingerprint", "method", "task",
            "description", "size", "created", "manifest")


class LibraryError(ValueError):
    """A library operation was refused: a bad reference, a foreign base, a corrupt store."""


@dataclass(frozen=True)
class Entry:
    """One library entry as the index holds it. ``lineage``: ``((parent id, how), ...)``, a
    parent may since have been removed; ``path`` / ``routing_path`` are filled by the library."""

    id: int
    name: str
    version: int
    sha256: str
    routing_sha256: str
    base_fingerprint: str
    method: str
    task: str | None
    description: str | None
    size: int
    created: float
    manifest: dict = field(repr=False)
    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    lineage: tuple[tuple[int, str], ...] = ()
    path: Path | None = None
    routing_path: Path | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name@3"`` -> ``("name", 3)``; ``"name"`` -> ``("name", None)`` (the newest version)."""
    name, sep, version = ref.rpartition("@")
    if not sep:
        return ref, None
    if not name or not version.isdigit() or int(version) < 1:
        raise LibraryError(f"expected NAME or NAME@VERSION (VERSION a positive integer), found {ref!r}")
    return name, int(version)


class Index:
    """The SQLite file. Connections are per call (safe across threads and forked workers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise LibraryError(f"{path}: index schema version {row[0]} is newer than this deltakit's "
                                   f"({SCHEMA_VERSION})")

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ meta
    def meta(self, key: str, db: sqlite3.Connection | None = None) -> str | None:
        with contextlib.nullcontext(db) if db is not None else self.connect() as c:
            row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ writes
    @staticmethod
    def next_version(db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT MAX(version) FROM entries WHERE name = ?", (name,)).fetchone()
        return (row[0] or 0) + 1

    @staticmethod
    def insert(db: sqlite3.Connection, row: dict, tags: Sequence[str], groups: Sequence[str],
               lineage: Sequence[tuple[int, str]]) -> int:
        """Insert an entry with its tags, groups and lineage; returns its id."""
        cols = [c for c in _COLUMNS if c != "id"]
        values = [json.dumps(row[c], sort_keys=True) if c == "manifest" else row[c] for c in cols]
        try:
            cur = db.execute(f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                             values)
        except sqlite3.IntegrityError:
            raise LibraryError(f"{row['name']}@{row['version']} is already in the library") from None
        eid = cur.lastrowid
        db.executemany("INSERT OR IGNORE INTO tags VALUES (?, ?)", [(eid, t) for t in tags])
        db.executemany("INSERT OR IGNORE INTO groups VALUES (?, ?)", [(eid, g) for g in groups])
        for parent, how in lineage:
            if db.execute("SELECT 1 FROM entries WHERE id = ?", (parent,)).fetchone() is None:
                raise LibraryError(f"lineage: expected an existing entry id as parent, found {parent}")
            db.execute("INSERT INTO lineage VALUES (?, ?, ?)", (eid, parent, how))
        return eid

    @staticmethod
    def delete(db: sqlite3.Connection, entry_id: int) -> None:
        db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    # ------------------------------------------------------------------ reads
    def entries(self, *, name: str | None = None, task: str | None = None, tag: str | None = None,
                group: str | None = None, method: str | None = None, version: int | None = None,
                sha256: str | None = None, db: sqlite3.Connection | None = None) -> list[Entry]:
        """Entries matching every filter given, by name then version."""
        where, args = [], []
        for col, val in (("name", name), ("task", task), ("method", method), ("version", version),
                         ("sha256", sha256)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if tag is not None:
            where.append("id IN (SELECT entry_id FROM tags WHERE tag = ?)")
            args.append(tag)
        if group is not None:
            where.append("id IN (SELECT entry_id FROM groups WHERE grp = ?)")
            args.append(group)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM entries" + (f" WHERE {' AND '.join(where)}" if where else "")
        with contextlib.nullcontext(db) if db is not None else self.connect() as c:
            rows = c.execute(sql + " ORDER BY name, version", args).fetchall()
            return [self._entry(c, r) for r in rows]

    @staticmethod
    def _entry(db: sqlite3.Connection, r: tuple) -> Entry:
        d = dict(zip(_COLUMNS, r))
        d["manifest"] = json.loads(d["manifest"])
        eid = d["id"]
        tags = tuple(t for (t,) in db.execute("SELECT tag FROM tags WHERE entry_id = ? ORDER BY tag", (eid,)))
        groups = tuple(g for (g,) in db.execute("SELECT grp FROM groups WHERE entry_id = ? ORDER BY grp", (eid,)))
        lineage = tuple(db.execute("SELECT parent_id, how FROM lineage WHERE entry_id = ? ORDER BY parent_id",
                                   (eid,)).fetchall())
        return Entry(**d, tags=tags, groups=groups, lineage=lineage)

    def resolve(self, ref: str, db: sqlite3.Connection | None = None) -> Entry:
        """``NAME`` (its newest version) or ``NAME@VERSION`` -> the entry; one-line error if absent."""
        name, version = parse_ref(ref)
        found = self.entries(name=name, version=version, db=db)
        if not found:
            known = "" if version is None else f" (versions: {[e.version for e in self.entries(name=name, db=db)]})"
            raise LibraryError(f"no library entry {ref!r}{known}")
        return found[-1]

    def referenced(self, db: sqlite3.Connection) -> tuple[set[str], set[str]]:
        """(object sha256s, routing sha256s) some entry still uses."""
        rows = db.execute("SELECT sha256, routing_sha256 FROM entries").fetchall()
        return {r[0] for r in rows}, {r[1] for r in rows}

    def integrity(self) -> str:
        with self.connect() as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]
