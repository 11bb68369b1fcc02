"""Shared tiny models and data for the training tests (no hub, no network)."""
from __future__ import annotations

import torch


def tiny_bert(seed: int = 0, dropout: float = 0.1, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def freeze_all_but(model: torch.nn.Module, *substrings: str) -> None:
    """Stand-in for deltakit.attach in tests that must not depend on the core."""
    for n, p in model.named_parameters():
        p.requires_grad = any(s in n for s in substrings)


def token_rows(n: int = 48, seq: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Rows whose label is whether token 7 occurs: learnable by a tiny BERT."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    labels = (ids == 7).any(1).long() | (ids[:, 0] > 50).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def build_for_parity(mode: str):
    """Tiny BERT without dropout (ranks draw different dropout masks), trainable part by ``mode``."""
    model = tiny_bert(dropout=0.0)
    if mode == "lora":
        import deltakit as dk

        dk.attach(model, dk.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]),
                  name="task")
    else:
        freeze_all_but(model, "classifier", "layer.1.attention")
        # trainable but never used: its grad stays None, so AdamW must skip it (no weight decay)
        model.register_parameter("unused_probe", torch.nn.Parameter(torch.ones(2, 2)))
    return model


def linear_rows(n: int = 32) -> list[dict[str, torch.Tensor]]:
    """Rows of a linearly separable 2-class problem for a ``Linear(4, 2)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": a, "labels": b} for a, b in zip(x, (x[:, 0] > 0).long())]


def linear_loss(m, b):
    return torch.nn.functional.cross_entropy(m(b["x"]), b["labels"])


def linear_model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def token_label_loader(n: int = 32, batch: int = 8, seed: int = 0):
    """Random token rows with random 3-class labels, shuffled: data for callback / schedule tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 64, (n, 6), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": a, "labels": b} for a, b in zip(x, y)],
                                       batch_size=batch, shuffle=True)
