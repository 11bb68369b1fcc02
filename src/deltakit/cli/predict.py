"""``deltakit predict MODEL_OR_ADAPTER --data FILE -o OUT``: write each row's label and probabilities."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import add_scoring_args, check_labels, check_output_file, class_probabilities, read_data

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="write predictions (label and class probabilities) for a data file",
                       description="Predict every row of a file (labels optional) with a classifier: an adapter "
                                   "on its base, or a checkpoint. Writes OUT atomically: .tsv (index, "
                                   "[label,] prediction, prob_0 ... prob_K-1) or .jsonl ({index, [label,] "
                                   "prediction, probabilities}), rows in file order.")
    add_scoring_args(p)
    p.add_argument("-o", "--out", required=True, help="output file, .tsv or .jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io.files import atomic_write
    from ..io.models import load_scorer

    suffix = Path(args.out).suffix
    if suffix not in (".tsv", ".jsonl"):
        raise ValueError(f"-o {args.out}: expected a file ending in .tsv or .jsonl, found {suffix or 'no suffix'!r}")
    out = check_output_file(args.out, args.overwrite, [args.data, args.model_or_adapter])
    rows, labelled = read_data(args.data, args.split, need_labels=False)
    model, tok = load_scorer(args.model_or_adapter, args.model, strict_base=args.strict_base)
    k = int(model.config.num_labels)
    if labelled:
        check_labels(rows, k, args.data)
    probs = class_probabilities(model, tok, rows, args.batch_size, args.max_length)
    preds = probs.argmax(-1).tolist()
    with atomic_write(out, "w") as f:
        if suffix == ".tsv":
            f.write("\t".join(["index", *(["label"] if labelled else []), "prediction",
                               *(f"prob_{j}" for j in range(k))]) + "\n")
        for i, (r, pred, pr) in enumerate(zip(rows, preds, probs.tolist())):
            gold = [int(r["label"])] if labelled else []
            if suffix == ".tsv":
                f.write("\t".join(map(str, [i, *gold, pred, *pr])) + "\n")
            else:
                rec = {"index": i, **({"label": gold[0]} if labelled else {}), "prediction": pred,
                       "probabilities": pr}
                f.write(json.dumps(rec) + "\n")
    print(f"wrote {len(rows)} predictions to {out}")
    return 0
