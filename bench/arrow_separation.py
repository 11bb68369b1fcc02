"""Can the library's adapters be told apart from their weights? Per-token routing accuracy on
SmolLM2's per-task LoRAs for Arrow and data-free variants of it.

Why this exists: in bench/results/routing.md, Arrow over the 8 task LoRAs of bench/llm_tasks.py
collapses to the yes/no answer format (below the base). This measures the mechanism directly:
each dev prompt of task t runs through the base model; at every adapted layer (every third
block, all 7 linears, to keep memory small) each token is scored against each adapter, and
the token counts as routed right when the top adapter is t's own. Chance is 1/K.

Scores compared (all data-free: they read only the adapters' weights):
- ``arrow``: ``|<x, v_k>|``, v_k the top right-singular vector of dW_k (Ostapenko et al. 2024);
- ``arrow_minus_mean``: the same with v_k from dW_k - mean_j dW_j (the shared part removed,
  in the spirit of GenKnowSub's subtraction of a general-knowledge LoRA);
- ``energy``: ``||dW_k x||`` (every singular direction, not just the top one);
- ``energy_per_norm``: ``||dW_k x|| / ||dW_k||_F``;
- ``energy_centred``: ``||(dW_k - mean_j dW_j) x||``.
``seq_majority`` is the fraction of prompts whose most-voted adapter (over tokens and layers)
is their own.

    python bench/arrow_separation.py --tasks sst2,ag_news,trec --adapters runs/llm_tasks --rows 6
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch

from _common import DEFAULT_DATA, load_avg, machine_info, write_json

HERE = Path(__file__).resolve().parent
TASKS = "sst2,cola,mrpc,rte,qnli,subj,trec,ag_news"


def _layers(model, tasks, every: int):
    from deltakit.core.layer import DeltaLayer
    out = {}
    for n, m in model.named_modules():
        hit = re.search(r"layers\.(\d+)\.", n)
        if isinstance(m, DeltaLayer) and hit and int(hit.group(1)) % every == 1 and all(t in m.deltas for t in tasks):
            out[n] = m
    return out


def _top_right(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(w.double(), full_matrices=False)[2][0].float()


@torch.no_grad()
def _tables(layers, tasks):
    """Per layer: prototypes (plain and mean-removed) and each adapter's scaled factors."""
    protos, centred, factors = {}, {}, {}
    for n, m in layers.items():
        w = torch.stack([m.deltas[t].product().float() for t in tasks])
        protos[n] = torch.stack([_top_right(x) for x in w])
        centred[n] = torch.stack([_top_right(x - w.mean(0)) for x in w])
        factors[n] = [(m.deltas[t].lora_B.detach().float() * m.deltas[t].scale, m.deltas[t].lora_A.detach().float())
                      for t in tasks]
        del w
    return protos, centred, factors


@torch.no_grad()
def _inputs(model, tok, layers, tasks, rows: int, seed: int):
    """Each prompt's input at each layer ``(T, in)``, and the prompt's task index."""
    import deltakit as dk
    from deltakit.train.generate import encode_prompts
    from deltakit.train.instruct import read_task_file
    seen = collections.defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0][0].float()))
             for n, m in layers.items()]
    truth = []
    try:
        with dk.disabled(model):
            for i, t in enumerate(tasks):
                for ex in read_task_file(Path(DEFAULT_DATA) / t / "dev.tsv", t, max_rows=rows, seed=seed):
                    model(torch.tensor([encode_prompts(tok, [ex["messages"][:-1]])[0]]))
                    truth.append(i)
    finally:
        for h in hooks:
            h.remove()
    return seen, truth


def _accuracy(score, seen, truth, k: int) -> dict:
    tok_acc, seq_ok = [], []
    for s, t in enumerate(truth):
        votes, accs = torch.zeros(k), []
        for n, xs in seen.items():
            top = score(n, xs[s]).argmax(-1)
            accs.append((top == t).float().mean())
            votes += torch.bincount(top, minlength=k).float()
        tok_acc.append(float(torch.stack(accs).mean()))
        seq_ok.append(float(votes.argmax() == t))
    return {"token_accuracy": round(sum(tok_acc) / len(tok_acc), 4), "seq_majority": round(sum(seq_ok) / len(seq_ok), 4)}


def _scores(protos, centred, factors):
    def ys(n, x):  # (T, K, out)
        return torch.stack([(x @ a.T) @ b.T for b, a in factors[n]], dim=1)
    fro = {n: torch.tensor([float((b.T @ b * (a @ a.T)).sum().sqrt()) for b, a in f]) for n, f in factors.items()}
    return {
        "arrow": lambda n, x: (x @ protos[n].T).abs(),
        "arrow_minus_mean": lambda n, x: (x @ centred[n].T).abs(),
        "energy": lambda n, x: ys(n, x).norm(dim=-1),
        "energy_per_norm": lambda n, x: ys(n, x).norm(dim=-1) / fro[n],
        "energy_centred": lambda n, x: (lambda y: (y - y.mean(1, keepdim=True)).norm(dim=-1))(ys(n, x)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=TASKS, help="comma-separated tasks (default all 8)")
    p.add_argument("--adapters", default="runs/llm_tasks", help="one adapter directory per task (bench/llm_tasks.py)")
    p.add_argument("--rows", type=int, default=3, help="dev prompts per task")
    p.add_argument("--every", type=int, default=3, help="use every n-th block (memory)")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/arrow_separation.json)")
    a = p.parse_args(argv)
    import deltakit as dk
    from deltakit.io.models import load_causal_lm
    torch.set_num_threads(1)
    tasks = a.tasks.split(",")
    model, tok = load_causal_lm("smollm2")
    model.eval()
    for t in tasks:
        dk.load_adapter(model, HERE.parent / a.adapters / t, name=t)
    layers = _layers(model, tasks, a.every)
    load0 = load_avg()
    seen, truth = _inputs(model, tok, layers, tasks, a.rows, seed=3)
    res = {name: _accuracy(fn, seen, truth, len(tasks)) for name, fn in _scores(*_tables(layers, tasks)).items()}
    out = {"tasks": tasks, "adapters": a.adapters, "rows_per_task": a.rows, "layers": len(layers),
           "chance": round(1 / len(tasks), 4), "scores": res, "load_start": load0, "load_end": load_avg(),
           "machine": machine_info("transformers")}
    path = Path(a.out) if a.out else HERE / "results" / "arrow_separation.json"
    write_json(path, out)
    for name, r in res.items():
        print(f"{name:18s} token accuracy {r['token_accuracy']:.3f}  prompt majority {r['seq_majority']:.3f}"
              f"  (chance {out['chance']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
