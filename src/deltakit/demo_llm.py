"""The demo's generative part: SmolLM2-135M-Instruct, the base vs a LoRA trained on one task.

The task is read as an instruction task (:data:`deltakit.train.instruct.TASKS`: a prompt, the
answer a word). The base model answers a seeded dev subsample by greedy generation; a LoRA
(r=16 on every linear layer of the blocks) is trained on a seeded train subsample with the
loss on the answer tokens only (bf16 autocast), answers the same rows, and both are scored
by mapping each answer to a label (:func:`deltakit.train.gen_eval.answer_label`). A few
answers are printed side by side, and the figures go to ``<out>/results.json`` under
``"generative"`` and the adapter to ``<out>/adapters/llm-<task>``. Last, the serving step
(:mod:`deltakit.demo_serve`): the same model is served on 127.0.0.1 as the base and as the LoRA,
a few of those dev prompts go to both at once through the ``openai`` client, and the answers and
the server's per-adapter metrics are printed.

Data: the real SST-2 from ``$DELTAKIT_GLUE_DIR/sst2`` (default ``/work/shared/data/text``)
when it is there; otherwise deltakit's synthetic ``sentiment`` task (review sentences with
negation and "but" clauses, :mod:`deltakit.train.synthetic`) asked with the same prompt, so
``make demo`` runs on a fresh machine. The output says which one it used.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LlmDemoConfig", "run_llm", "check_available", "LLAMA_LINEAR"]

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlmDemoConfig:
    """Defaults sized for about 1.5-2 minutes on 2 idle cores (plus ~40 s the first time, when
    SmolLM2 is dequantised into the cache)."""

    model: str = "smollm2"
    out: str = "runs/demo"
    task: str = "sst2"
    data_dir: str | None = None  # default: $DELTAKIT_GLUE_DIR or /work/shared/data/text
    steps: int = 30
    batch_size: int = 8
    n_dev: int = 96
    lr: float = 2e-3
    r: int = 16
    alpha: float = 32.0
    max_new_tokens: int = 6
    show: int = 4
    serve: int = 3  # dev rows asked of the served base and LoRA each (0: no serving step)
    seed: int = 0


def check_available(model: str = "smollm2", serve: bool = True) -> None:
    """Raise (one line) before any work when the bundled model's package, or a package of the
    serving step, is missing."""
    if serve:
        from .demo_serve import check_serving_available
        check_serving_available()
    if model == "smollm2":
        from .io.smollm2 import package_dir
        package_dir()


def _task_data(cfg: LlmDemoConfig) -> tuple[list[dict], list[dict], str]:
    """(train examples, dev examples, where they came from): real task files if present, else synthetic."""
    from .train.instruct import read_task_file, task_examples
    from .train.synthetic import make_task

    root = Path(cfg.data_dir or os.environ.get("DELTAKIT_GLUE_DIR", "/work/shared/data/text")) / cfg.task
    n_train = cfg.steps * cfg.batch_size
    if (root / "train.tsv").is_file() and (root / "dev.tsv").is_file():
        return (read_task_file(root / "train.tsv", cfg.task, max_rows=n_train, seed=cfg.seed),
                read_task_file(root / "dev.tsv", cfg.task, max_rows=cfg.n_dev, seed=cfg.seed), str(root))
    if cfg.task != "sst2":
        raise FileNotFoundError(f"expected {root}/train.tsv and dev.tsv for task {cfg.task!r}, found none")
    train, dev = make_task("sentiment", n_train=n_train, n_dev=cfg.n_dev, seed=cfg.seed)
    return task_examples(train, "sst2"), task_examples(dev, "sst2"), "deltakit.train.synthetic:sentiment"


def _answers(model, tok, dev: list[dict], cfg: LlmDemoConfig) -> dict:
    from .train.gen_eval import evaluate_generation

    t0 = time.time()
    r = evaluate_generation(model, tok, dev, task=cfg.task, max_new_tokens=cfg.max_new_tokens, batch_size=16)
    return {"accuracy": round(r["accuracy"], 4), "unmapped": r["unmapped"], "outputs": r["outputs"],
            "seconds": round(time.time() - t0, 1)}


def _train(model, tok, train: list[dict], cfg: LlmDemoConfig):
    from .core.adapter import attach
    from .methods.lora import LoraConfig
    from .train import fit
    from .train.instruct import make_instruction_loader

    torch.manual_seed(cfg.seed)
    adapter = attach(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, targets=LLAMA_LINEAR), name=f"llm-{cfg.task}")
    loader = make_instruction_loader(train, tok, batch_size=cfg.batch_size, max_length=256, shuffle=True,
                                     seed=cfg.seed)
    print(f"[{cfg.task}] training a LoRA ({adapter.num_parameters():,} parameters) for {cfg.steps} steps of "
          f"{cfg.batch_size} rows; {loader.dataset.report}")
    result = fit(model, loader, lr=cfg.lr, max_steps=cfg.steps, warmup_steps=max(1, cfg.steps // 10),
                 schedule="linear", seed=cfg.seed, log_every=10, autocast=torch.bfloat16)
    return adapter, result


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _changed_first(dev: list[dict], base: dict, lora: dict) -> list[int]:
    """Dev row indices, those where the LoRA's answer differs from the base's first."""
    return sorted(range(len(dev)), key=lambda i: (base["outputs"][i] == lora["outputs"][i], i))


def _input_text(example: dict) -> str:
    """The prompt's first ``Field: text`` line (the instruction itself is the same on every row)."""
    user = example["messages"][0]["content"].split("\n")
    return _shorten(next((u.split(": ", 1)[1] for u in user if ": " in u), user[-1]))


def _examples(dev: list[dict], base: dict, lora: dict, n: int) -> list[dict]:
    """``n`` dev rows (see :func:`_changed_first`) with both answers and the gold one."""
    rows = []
    for i in _changed_first(dev, base, lora)[:n]:
        rows.append({"input": _input_text(dev[i]), "base": _shorten(base["outputs"][i], 24),
                     "lora": _shorten(lora["outputs"][i], 24), "gold": dev[i]["messages"][1]["content"]})
    return rows


def run_llm(cfg: LlmDemoConfig = LlmDemoConfig()) -> dict:
    """Base vs LoRA on ``cfg.task``: prints answers and accuracies, saves the adapter, returns the figures."""
    from ._fmt import table
    from .io.adapter_files import save_adapter
    from .io.models import load_causal_lm

    t_start = time.time()
    check_available(cfg.model)
    train, dev, source = _task_data(cfg)
    print(f"\nGenerative part: {cfg.model} on {cfg.task} as an instruction task ({source}: "
          f"{len(train)} train / {len(dev)} dev rows)")
    model, tok = load_causal_lm(cfg.model)
    model.eval()
    base = _answers(model, tok, dev, cfg)
    print(f"[{cfg.task}] base: accuracy {base['accuracy']:.3f}, {base['unmapped']} answers name no label "
          f"({base['seconds']} s)")
    t0 = time.time()
    adapter, result = _train(model, tok, train, cfg)
    train_s = round(time.time() - t0, 1)
    lora = _answers(model, tok, dev, cfg)
    out = Path(cfg.out) / "adapters" / f"llm-{cfg.task}"
    save_adapter(adapter, out, training={"steps": result.steps, "metrics": {"dev_accuracy": lora["accuracy"]},
                                         "data": [{"split": "train", "path": source, "rows": len(train)},
                                                  {"split": "dev", "path": source, "rows": len(dev)}],
                                         "settings": {**dataclasses.asdict(cfg), "method": "lora",
                                                      "targets": list(LLAMA_LINEAR)}})
    print(f"\nAnswers before (base) and after (LoRA), {cfg.show} dev rows (those the LoRA changed first):")
    print(table(_examples(dev, base, lora, cfg.show), ["input", "base", "lora", "gold"]))
    summary = {"model": cfg.model, "task": cfg.task, "data": source, "train_rows": len(train),
               "dev_rows": len(dev), "steps": result.steps, "base_acc": base["accuracy"],
               "base_unmapped": base["unmapped"], "lora_acc": lora["accuracy"], "lora_unmapped": lora["unmapped"],
               "train_s": train_s, "seconds": round(time.time() - t_start, 1), "adapter": str(out)}
    print(f"\nGenerative results (dev accuracy by generation, answers mapped to labels; unmapped = wrong)")
    print(table([summary], ["model", "task", "base_acc", "lora_acc", "base_unmapped", "lora_unmapped", "steps",
                            "train_s", "seconds"]))
    if cfg.serve:
        summary["serving"] = _serve(model, tok, adapter.name, out, dev, base, lora, cfg)
    _add_to_results(Path(cfg.out) / "results.json", summary, cfg)
    return summary


def _serve(model, tok, name: str, path: Path, dev: list[dict], base: dict, lora: dict, cfg: LlmDemoConfig) -> dict:
    """The serving step: ``cfg.serve`` dev prompts each to the served base and to the LoRA, all at
    once; the answers are also compared with the in-process greedy ones printed above."""
    from ._fmt import table
    from .core.adapter import detach
    from .demo_serve import ServeJob, serve_and_ask

    detach(model, name)  # the server attaches it again from its saved directory, as any served adapter
    base_name = Path(cfg.model).name
    rows = _changed_first(dev, base, lora)[: cfg.serve]
    jobs = [ServeJob(m, tuple(dev[i]["messages"][:-1])) for i in rows for m in (base_name, name)]
    print(f"\nServing: deltakit serve on 127.0.0.1 (a free port) with {base_name} and the LoRA as {name!r}; "
          f"{len(jobs)} chat requests at once through the openai client, {len(rows)} dev prompts to each model")
    r = serve_and_ask(model, tok, base_name, {name: str(path)}, jobs, cfg.max_new_tokens)
    shown, same = [], 0
    for k, i in enumerate(rows):  # jobs (and answers) go base, LoRA for each row
        pair = r["answers"][2 * k: 2 * k + 2]
        shown.append({"input": _input_text(dev[i]), **{a["model"]: _shorten(a["answer"], 24) for a in pair},
                      "gold": dev[i]["messages"][-1]["content"]})
        same += (pair[0]["answer"] == base["outputs"][i]) + (pair[1]["answer"] == lora["outputs"][i])
    r.update(rows=rows, same_as_in_process=same)
    print(table(shown, ["input", base_name, name, "gold"]))
    print(f"{same} of {len(jobs)} served answers equal the in-process greedy answers of the same model above")
    print(f"\nThe server's own figures per model (from {r['url']}/metrics; latency = mean seconds from arrival "
          f"to the last token, first_token = to the first):")
    metrics = [{"model": m, **r["metrics"][m]} for m in (base_name, name)]
    print(table(metrics, ["model", "requests", "prompt_tokens", "completion_tokens", "latency_s", "first_token_s"]))
    print(f"every request answered and counted; server started, asked and stopped in {r['seconds']} s")
    return r


def _add_to_results(path: Path, summary: dict, cfg: LlmDemoConfig) -> None:
    """The demo's one results file gains a ``generative`` entry (written atomically)."""
    from .io.files import write_json

    results = json.loads(path.read_text()) if path.is_file() else {}
    results["generative"] = {**summary, "config": dataclasses.asdict(cfg)}
    write_json(path, results)
