"""``deltakit eval MODEL_OR_ADAPTER --data FILE``: score a classifier on a labelled file."""
from __future__ import annotations

import json

from ._common import add_scoring_args, check_labels, class_probabilities, read_data

__all__ = ["add_parser", "run", "default_metrics"]

METRIC_CHOICES = ("accuracy", "f1", "f1_macro", "mcc")


def default_metrics(num_labels: int) -> list[str]:
    """What GLUE reports: accuracy always; with two classes F1 of class 1 (MRPC, QQP) and
    Matthews correlation (CoLA); with more, macro F1 and the multi-class MCC."""
    return ["accuracy", "f1", "mcc"] if num_labels == 2 else ["accuracy", "f1_macro", "mcc"]


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a model or adapter on a labelled data file",
                       description="Score a classifier (an adapter on its base, or a checkpoint such as a merged "
                                   "export or a 'deltakit merge' output) on a labelled file. Default metrics: "
                                   "accuracy, plus F1 (class 1) and MCC for two classes, or macro F1 and MCC "
                                   "for more. Example: deltakit eval runs/sst2 --data data/sst2/dev.tsv")
    add_scoring_args(p)
    p.add_argument("--metric", action="append", choices=METRIC_CHOICES, default=None,
                   help="metric to report, repeatable (default: by the number of classes, see above)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from .._fmt import table
    from ..io.models import load_scorer
    from ..train.metrics import METRICS

    rows, _ = read_data(args.data, args.split, need_labels=True)
    model, tok = load_scorer(args.model_or_adapter, args.model, strict_base=args.strict_base)
    k = int(model.config.num_labels)
    check_labels(rows, k, args.data)
    probs = class_probabilities(model, tok, rows, args.batch_size, args.max_length)
    import torch
    preds, labels = probs.argmax(-1), torch.tensor([int(r["label"]) for r in rows])
    scores = {m: METRICS[m](preds, labels) for m in (args.metric or default_metrics(k))}
    if args.json:
        print(json.dumps({"model": args.model_or_adapter, "data": args.data, "rows": len(rows),
                          "metrics": scores}, indent=2))
    else:
        print(f"{args.model_or_adapter} on {args.data} ({len(rows)} rows, {k} classes)")
        print(table([{"metric": m, "value": f"{v:.4f}"} for m, v in scores.items()], ["metric", "value"]))
    return 0
