"""Model Surgery (Wang et al., 2024, "Model Surgery: Modulating LLM's Behavior Via Simple Parameter
Editing") https://arxiv.org/abs/2407.08770

1. Behaviour probe: a linear classifier ``p(y | h) = softmax(W h + b)`` (one row per class) on
   the mean over real tokens of one layer's hidden states ``h`` (B, H), trained with the
   negative log-likelihood (Adam, lr 1e-4, 20 epochs, batches of 32: the authors' release,
   which follows PPLM's discriminator). ``w = W[behaviour]`` is the undesired behaviour's
   direction (H,).
2. Region: the rows g_j (H,) of every FFN gate projection (``mlp.gate_proj.weight``
   (I, H) in LLaMA / Mistral) ranked over all layers by ``-cos(g_j, w)``; the top ``n_rows``
   form the region (the release: 4 x 4096 rows of LLaMA-2-7B / Mistral-7B, i.e. 4 x H).
3. Edit: ``g_j <- g_j + alpha * w`` for every row in the region.

The edit is returned as a :class:`~deltakit.taskvec.TaskVector` (dW non-zero on the region's
rows only), so it saves, applies, merges and compresses like any other delta. Hidden states
come from the model's own ``output_hidden_states`` on batches shaped as the library's data
loaders give them (``input_ids``, ``attention_mask``, ``labels``; padding is left out of the
mean by the attention mask, as :func:`deltakit.merge.collect_grams` leaves it out of its
Grams). The model is not modified.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltakit.core.seeding import generator
from deltakit.taskvec import TaskVector

__all__ = ["pooled_hidden_states", "train_probe", "surgery_delta", "model_surgery", "SurgeryResult"]


def pooled_hidden_states(model: nn.Module, batches: Iterable[Mapping[str, Any]], *,
                         layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, H) fp32, labels (N,)): each example's hidden state at ``layer``
    (``hidden_states[layer]``) averaged over its real tokens."""
    feats, labels = [], []
    with torch.no_grad():
        for batch in batches:
            if "labels" not in batch:
                raise ValueError(f"model surgery: expected batches with 'labels', found keys {sorted(batch)}")
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = model(**inputs, output_hidden_states=True)
            h = out.hidden_states[layer].float()  # (B, T, H)
            mask = batch.get("attention_mask")
            m = torch.ones(h.shape[:2]) if mask is None else mask.to(h.device).float()
            feats.append((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-10))
            labels.append(torch.as_tensor(batch["labels"]).long().reshape(-1))
    if not feats:
        raise ValueError("model surgery: expected at least one batch, found none")
    return torch.cat(feats), torch.cat(labels)


def train_probe(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                epochs: int = 20, lr: float = 1e-4, batch_size: int = 32, seed: int = 0) -> nn.Linear:
    """The behaviour probe: ``nn.Linear(H, C)`` trained with NLL on log-softmax (Adam)."""
    c = int(num_classes or int(labels.max()) + 1)
    if c < 2:
        raise ValueError(f"train_probe: expected at least 2 classes, found {c}")
    g = generator(seed, "surgery-probe")
    probe = nn.Linear(features.shape[1], c)
    with torch.no_grad():  # nn.Linear's own init, drawn from the seeded generator
        bound = 1 / features.shape[1] ** 0.5
        probe.weight.uniform_(-bound, bound, generator=g)
        probe.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            F.nll_loss(F.log_softmax(probe(features[idx]), -1), labels[idx]).backward()
            opt.step()
    return probe


def surgery_delta(weights: Mapping[str, torch.Tensor], direction: torch.Tensor, *, n_rows: int,
                  alpha: float) -> tuple[TaskVector, list[tuple[str, int]]]:
    """The edit ``g_j += alpha * w`` on the ``n_rows`` rows of ``weights`` (name -> (I, H)) with
    the largest ``-cos(g_j, w)`` over all of them -> (dW task vector, [(name, row)] best first)."""
    w = direction.detach().float()
    scores, where = [], []
    for n, g in weights.items():
        if g.dim() != 2 or g.shape[1] != w.numel():
            raise ValueError(f"model surgery: {n}: expected rows of size {w.numel()} (I, H), found {tuple(g.shape)}")
        scores.append(-F.cosine_similarity(g.detach().float(), w.unsqueeze(0), dim=1))
        where += [(n, j) for j in range(g.shape[0])]
    flat = torch.cat(scores)
    if not 0 < n_rows <= flat.numel():
        raise ValueError(f"model surgery: n_rows: expected 1..{flat.numel()}, found {n_rows}")
    top = torch.sort(flat, descending=True, stable=True).indices[:n_rows].tolist()
    region = [where[i] for i in top]
    deltas = {n: torch.zeros(g.shape, dtype=torch.float32) for n, g in weights.items()}
    for n, j in region:
        deltas[n][j] += alpha * w
    touched = {n for n, _ in region}
    return TaskVector.from_mapping({n: d for n, d in deltas.items() if n in touched}), region


@dataclass
class SurgeryResult:
    probe: nn.Linear
    direction: torch.Tensor          # (H,) the probe's row for the undesired behaviour
    region: list[tuple[str, int]]    # (weight name, row), most negative cosine first
    task_vector: TaskVector          # the edit dW
    probe_accuracy: float            # on the features it was trained on


def _gate_weights(model: nn.Module, targets: Sequence[str] | None) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    names = list(targets) if targets is not None else [n for n in params if n.endswith("mlp.gate_proj.weight")]
    missing = [n for n in names if n not in params]
    if missing or not names:
        raise ValueError(f"model surgery: expected FFN gate weights (e.g. '...mlp.gate_proj.weight') as targets, "
                         f"found {missing[0] if missing else 'none'}")
    return {n: params[n] for n in names}


def model_surgery(model: nn.Module, batches: Iterable[Mapping[str, Any]], *, alpha: float,
                  behaviour: int = 1, layer: int = -1, n_rows: int | None = None,
                  targets: Sequence[str] | None = None, epochs: int = 20, lr: float = 1e-4,
                  batch_size: int = 32, seed: int = 0) -> SurgeryResult:
    """Probe ``layer``'s hidden states on labelled ``batches``, then edit the region (default
    ``n_rows`` = 4 x H, the release's count) along the probe's row ``behaviour``.

    ``targets``: the weights whose rows are ranked (default every ``*mlp.gate_proj.weight``).
    Apply the edit with ``result.task_vector.apply(model)`` or save it.
    """
    feats, labels = pooled_hidden_states(model, batches, layer=layer)
    probe = train_probe(feats, labels, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    with torch.no_grad():
        acc = float((probe(feats).argmax(-1) == labels).float().mean())
    if not 0 <= behaviour < probe.out_features:
        raise ValueError(f"model surgery: behaviour: expected a class in 0..{probe.out_features - 1}, "
                         f"found {behaviour}")
    direction = probe.weight.detach()[behaviour].clone()
    rows = 4 * direction.numel() if n_rows is None else n_rows
    tv, region = surgery_delta(_gate_weights(model, targets), direction, n_rows=rows, alpha=alpha)
    return SurgeryResult(probe, direction, region, tv, acc)
