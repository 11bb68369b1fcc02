"""Training and data loading for deltas: :func:`fit`, :func:`evaluate`, datasets, synthetic tasks.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from deltakit.train import fit
    >>> model = torch.nn.Linear(4, 2)
    >>> data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(16)]
    >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["labels"])
    >>> fit(model, DataLoader(data, batch_size=4), max_steps=3, loss_fn=loss, progress=False).steps
    3
"""
from deltakit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from deltakit.train.data import (DataFormatError, TextClassificationDataset, check_labels, describe_rows,
                                 label_histogram, load_glue_dir, make_loader, num_labels, provenance, read_rows,
                                 rows_from_dataset, write_tsv)
from deltakit.train.distributed import is_main_process, setup_distributed
from deltakit.train.early_stop import EarlyStopping
from deltakit.train.loop import (StatefulCallback, TrainingDivergedError, TrainResult, compile_model, compute_loss,
                                 evaluate, fit, make_optimizer, make_scheduler, trainable_parameters)
from deltakit.train.metrics import accuracy, f1, f1_macro, mcc
from deltakit.train.synthetic import make_task, task_num_labels, write_task

__all__ = [
    "fit", "TrainResult", "TrainingDivergedError", "StatefulCallback", "EarlyStopping", "evaluate", "compute_loss",
    "compile_model",
    "trainable_parameters", "make_optimizer", "make_scheduler", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint",
    "setup_distributed", "is_main_process", "accuracy", "f1", "f1_macro", "mcc",
    "read_rows", "rows_from_dataset", "load_glue_dir", "write_tsv", "num_labels", "DataFormatError",
    "check_labels", "label_histogram", "describe_rows", "provenance",
    "TextClassificationDataset", "make_loader", "make_task", "write_task", "task_num_labels",
]
