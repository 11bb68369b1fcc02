"""Helpers the scoring commands share: reading a data file or task directory, checking an output path."""
from __future__ import annotations

import csv
import json
from pathlib import Path

MODEL_OR_ADAPTER_HELP = ("an adapter directory (scored on the base its manifest records, or --model), or a "
                         "sequence-classification checkpoint: a merged export, a 'deltakit merge' output, a hub id")
DATA_HELP = "a .tsv / .csv / .jsonl file with GLUE-style columns, or a task directory (its SPLIT file)"


def read_data(path: str, split: str, need_labels: bool = True) -> tuple[list[dict], bool]:
    """(rows, whether the rows carry labels). Unlabelled rows (only when ``need_labels`` is
    False) get label 0 so that the tokenising loader takes them; callers must not score them."""
    from ..train.data import DataFormatError, load_glue_dir, read_rows

    p = Path(path)
    if p.is_dir():
        p = next((p / f"{split}{s}" for s in (".tsv", ".csv", ".jsonl") if (p / f"{split}{s}").is_file()), p)
        if p.is_dir():
            return load_glue_dir(p, split), True  # raises its one-line "expected dev.tsv ..." error
    if need_labels or not p.is_file() or "label" in _columns(p):
        return read_rows(p), True
    rows = _read_unlabelled(p)
    if not rows:
        raise DataFormatError(f"{p}: expected at least one data row, found none")
    texts = ("sentence1", "sentence2") if "sentence1" in rows[0] else ("sentence",)
    for i, r in enumerate(rows):
        if not all(isinstance(r.get(c), str) for c in texts):
            raise DataFormatError(f"{p} row {i + 1}: expected text in column(s) {list(texts)}, found {r!r}")
    return [{**r, "label": 0} for r in rows], False


def _columns(p: Path) -> list[str]:
    """The header of a tsv / csv file or the keys of a jsonl file's first object."""
    with open(p, newline="", encoding="utf-8-sig") as f:
        if p.suffix == ".jsonl":
            first = next((line for line in f if line.strip()), "{}")
            try:
                obj = json.loads(first)
            except json.JSONDecodeError:
                return ["label"]  # let read_rows give its error with the line number
            return list(obj) if isinstance(obj, dict) else ["label"]
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if p.suffix == ".tsv" else csv.reader(f)
        return next(reader, ["label"])


def _read_unlabelled(p: Path) -> list[dict]:
    """Rows of a file with text columns and no ``label`` column (same dialects as ``read_rows``)."""
    from ..train.data import DataFormatError

    with open(p, newline="", encoding="utf-8-sig") as f:
        if p.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(f, 1):
                try:
                    obj = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{p} line {n}: expected a JSON object, found invalid JSON ({e})") from None
                if obj is not None:
                    rows.append(obj if isinstance(obj, dict) else {})
            return rows
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if p.suffix == ".tsv" else csv.reader(f)
        header = next(reader)
        if "sentence" not in header and not {"sentence1", "sentence2"} <= set(header):
            raise DataFormatError(f"{p}: expected columns 'sentence' (or 'sentence1' + 'sentence2'), found {header}")
        rows = []
        for n, fields in enumerate(reader, 2):
            if fields and len(fields) != len(header):
                raise DataFormatError(f"{p} line {n}: expected {len(header)} fields {header}, found {len(fields)}")
            if fields:
                rows.append(dict(zip(header, fields)))
        return rows


def check_output_file(out: str, overwrite: bool, inputs: list[str]) -> Path:
    """Refuse to write a file over one of the command's inputs, over a directory, or over an
    existing file unless ``overwrite``."""
    o = Path(out)
    for i in inputs:
        if Path(i).exists() and o.exists() and o.resolve() == Path(i).resolve():
            raise FileExistsError(f"-o {out}: expected a new file, found one of this command's inputs")
    if o.is_dir():
        raise IsADirectoryError(f"-o {out}: expected a file path, found a directory")
    if o.exists() and not overwrite:
        raise FileExistsError(f"-o {out}: expected a new file, found an existing one (pass --overwrite to replace it)")
    return o


def add_scoring_args(p) -> None:
    """The arguments ``eval`` and ``predict`` share."""
    p.add_argument("model_or_adapter", metavar="MODEL_OR_ADAPTER", help=MODEL_OR_ADAPTER_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--split", default="dev", help="which file of a task directory (default dev)")
    p.add_argument("--model", default=None,
                   help="base model for an adapter (default: the one its manifest records); a directory, hub id "
                        "or 'minilm'")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128, as train)")
    add_strict_base(p)


def add_strict_base(p) -> None:
    p.add_argument("--no-strict-base", dest="strict_base", action="store_false",
                   help="load an adapter onto a base whose weights differ from the one it was trained on "
                        "(the architecture and shapes are still checked)")


def class_probabilities(model, tok, rows: list[dict], batch_size: int, max_length: int):
    """Softmax over the model's labels for every row, in file order. Shape (N, K), float32."""
    import torch

    from ..train.data import make_loader

    if batch_size < 1 or max_length < 1:
        raise ValueError(f"expected --batch-size and --max-length >= 1, found {batch_size} and {max_length}")
    out = []
    with torch.no_grad():
        for batch in make_loader(rows, tok, batch_size=batch_size, max_length=max_length):
            batch.pop("labels")
            out.append(model(**batch).logits.float().softmax(-1))
    return torch.cat(out)


def check_labels(rows: list[dict], num_labels: int, data: str) -> None:
    """Every label must be one the model can predict."""
    top = max(int(r["label"]) for r in rows)
    if top >= num_labels:
        raise ValueError(f"{data}: expected labels 0..{num_labels - 1} (the model's {num_labels} classes), "
                         f"found label {top}")
