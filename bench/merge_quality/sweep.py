"""One kind of fine-tune (full or LoRA) through every merge method: reference scores,
statistics, then (A) every method at its default setting on selection + dev, (B) sweep
points on selection while the time budget allows, (C) dev at the chosen setting."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path

from _common import Log, timer

from .config import DATA_METHODS, NOT_APPLICABLE, SWEEPS, Config
from .finetune import compute_stats
from .scoring import Scorer, merge_once, normalised, run_adamerging

__all__ = ["run_kind", "full_values", "fmt_scores"]


def run_kind(cfg: Config, kind: str, tasks, tok, base_state, tvs: dict, heads: dict, cache: Path, deadline: float,
             log: Log, only: set[str] | None = None) -> dict:
    """The result of one kind: task-vector facts, references, statistics and every method."""
    return KindRun(cfg, kind, tasks, tok, base_state, tvs, heads, cache, deadline, log, only).run()


def task_vector_facts(tvs: Mapping[str, Mapping], tasks) -> dict:
    """Size, norms and pairwise cosines of the tasks' encoder task vectors (``TaskVector``'s own)."""
    from deltakit.taskvec import TaskVector

    objs = {t: TaskVector.from_mapping(tvs[t]) for t in tasks}
    names = list(tasks)
    first = tvs[names[0]]
    return {"tensors": len(first), "numel": sum(v.numel() for v in first.values()),
            "norms": {t: round(objs[t].norm(), 5) for t in names},
            "cosine": {f"{a}-{b}": round(objs[a].cosine(objs[b]), 5)
                       for i, a in enumerate(names) for b in names[i + 1:]}}


class KindRun:
    """The state one kind's merge phases share: scorer, statistics, per-method entries and
    the merged dWs owed a dev score (``best_dw``)."""

    def __init__(self, cfg, kind, tasks, tok, base_state, tvs, heads, cache, deadline, log, only) -> None:
        self.cfg, self.kind, self.tasks, self.tok, self.base_state = cfg, kind, tasks, tok, base_state
        self.tvs, self.heads, self.cache, self.deadline, self.log, self.only = tvs, heads, cache, deadline, log, only
        self.tvs_list = [tvs[t] for t in tasks]
        self.res: dict = {"timings": {}}
        self.methods: dict[str, dict] = {}
        self.best_dw: dict[str, dict] = {}
        self.dev_costs: list[float] = []

    def run(self) -> dict:
        res = self.res
        res["task_vector"] = task_vector_facts(self.tvs, self.tasks)
        self.scorer = Scorer(self.cfg, self.tasks, self.base_state)
        self.references()
        elapsed = timer()
        self.stats, res["stats"] = compute_stats(self.cfg, self.kind, self.tasks, self.tok, self.base_state,
                                                 self.tvs, self.heads, self.cache, self.log)
        res["timings"]["stats_s"] = elapsed()
        elapsed = timer()
        self.order = [m for m in _method_order() if self.want(m)]
        self.defaults()
        res["timings"]["defaults_s"] = elapsed()
        elapsed = timer()
        self.dev_cost = max(self.dev_costs) if self.dev_costs else 0.0
        self.sweeps()
        res["timings"]["sweeps_s"] = elapsed()
        elapsed = timer()
        self.chosen_dev()
        res["timings"]["chosen_dev_s"] = elapsed()
        res["methods"] = self.methods
        res["timings"]["eval_s_total"] = round(self.scorer.seconds, 1)
        res["timings"]["eval_calls"] = self.scorer.calls
        res["timings"]["dev_eval_s_max"] = round(self.dev_cost, 2)
        return res

    def want(self, method: str) -> bool:  # task arithmetic always runs: the reference (and AdaMerging's start)
        return self.only is None or method in self.only or method == "task_arithmetic"

    def references(self) -> None:
        """Each task's own fine-tune (the denominator) and the base encoder with its heads (the floor)."""
        res, tasks = self.res, self.tasks
        elapsed = timer()
        res["individual"] = {s: self.scorer.score(self.tvs, self.heads, s) for s in ("select", "dev")}
        res["base"] = {s: self.scorer.score({t: None for t in tasks}, self.heads, s) for s in ("select", "dev")}
        res["timings"]["reference_evals_s"] = elapsed()
        res["base"]["norm_dev"] = normalised(res["base"]["dev"], res["individual"]["dev"])
        self.log(f"{self.kind}: individual dev {fmt_scores(res['individual']['dev'])}; "
                 f"base(lam=0) dev {fmt_scores(res['base']['dev'])}")

    def _stats_for(self, method: str):
        return self.stats.get(DATA_METHODS[method]) if method in DATA_METHODS else None

    def point(self, method: str, values: dict) -> tuple[dict, dict | None]:
        """Merge at ``values`` and score it on the selection split -> (sweep point, merged dW or None)."""
        t_merge = timer()
        try:
            dw = merge_once(method, values, self.tvs_list, self.cfg, self._stats_for(method))
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
            self.log(f"  {self.kind}/{method} {values or 'default'}: ERROR {type(e).__name__}: {e}")
            return {"values": values, "error": f"{type(e).__name__}: {e}"}, None
        merge_s = t_merge()
        t_eval = timer()
        sc = self.scorer.score({t: dw for t in self.tasks}, self.heads, "select")
        pt = {"values": values, "is_default": not values, "merge_s": merge_s, "eval_s": t_eval(), "select": sc,
              "norm_select": normalised(sc, self.res["individual"]["select"])}
        self.log(f"  {self.kind}/{method} {values or 'default'}: select norm {pt['norm_select']['mean']} "
                 f"(merge {merge_s:.1f}s, eval {pt['eval_s']:.1f}s)")
        return pt, dw

    def dev(self, entry: dict, label: str, dw) -> float:
        """Score ``dw`` on dev into ``entry`` under ``label``; returns the seconds it took."""
        t_eval = timer()
        entry[f"dev_{label}"] = self.scorer.score({t: dw for t in self.tasks}, self.heads, "dev")
        entry[f"norm_dev_{label}"] = normalised(entry[f"dev_{label}"], self.res["individual"]["dev"])
        return t_eval()

    def _dev_default(self, entry: dict, dw) -> None:
        self.dev_costs.append(self.dev(entry, "default", dw))
        entry["dev_chosen"], entry["norm_dev_chosen"] = entry["dev_default"], entry["norm_dev_default"]

    def defaults(self) -> None:
        """(A) every method at its default setting (selection, then dev), AdaMerging last."""
        from deltakit.merge import get_merge

        for method in self.order:
            m = get_merge(method)
            entry = {"paper": m.paper, "inputs": m.inputs, "default_values": full_values(method, {}), "sweep": [],
                     "skipped_for_time": []}
            self.methods[method] = entry
            pt, dw = self.point(method, {})
            entry["sweep"].append(pt)
            if dw is not None:
                entry["chosen"] = {}
                self._dev_default(entry, dw)
        if self.want("adamerging"):  # the paper's defaults
            cfg = self.cfg
            entry = {"paper": "https://arxiv.org/abs/2310.02575", "inputs": "deltas",
                     "default_values": {"granularity": "layer", "steps": cfg.adamerging_steps, "lr": 1e-3,
                                        "init": cfg.adamerging_init},
                     "skipped_for_time": []}
            pt, dw = self.adamerging_point(cfg.adamerging_init)
            entry["sweep"] = [pt]
            if dw is not None:
                entry["info"], entry["chosen"] = pt["info"], {}
                self._dev_default(entry, dw)
            self.methods["adamerging"] = entry

    def adamerging_point(self, init: float) -> tuple[dict, dict | None]:
        """AdaMerging from every coefficient at ``init``, on the unlabelled selection inputs."""
        kind, cfg = self.kind, self.cfg
        try:
            dw, info = run_adamerging(cfg, self.tasks, self.tok, self.base_state, self.tvs_list, self.heads, init=init)
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
            self.log(f"  {kind}/adamerging init={init}: ERROR {type(e).__name__}: {e}")
            return {"values": {"init": init}, "error": f"{type(e).__name__}: {e}"}, None
        sc = self.scorer.score({t: dw for t in self.tasks}, self.heads, "select")
        default = init == cfg.adamerging_init
        pt = {"values": {} if default else {"init": init}, "is_default": default, "select": sc,
              "norm_select": normalised(sc, self.res["individual"]["select"]), "merge_s": info["seconds"],
              "info": info}
        self.log(f"  {kind}/adamerging init={init}: select norm {pt['norm_select']['mean']} ({info['seconds']:.0f}s, "
                 f"entropy {info['entropy_first']}->{info['entropy_last']}, coefficients {info['coef_min']}.."
                 f"{info['coef_max']})")
        return pt, dw

    def sweeps(self) -> None:
        """(B) sweep points on the selection split while the budget allows (keeping room for
        the dev evals of (C)); then AdaMerging from task arithmetic's chosen lam."""
        for method in self.order:
            entry = self.methods[method]
            if "chosen" in entry and self.cfg.sweep:
                self._sweep(method, entry)
        self._sweep_adamerging()

    def _sweep(self, method: str, entry: dict) -> None:
        seen = {json.dumps(full_values(method, {}), sort_keys=True, default=str)}
        points = SWEEPS.get(method, [])
        if self.cfg.max_sweep_points is not None:
            points = points[:self.cfg.max_sweep_points]
        best = entry["sweep"][0]
        for values in points:
            key = json.dumps(full_values(method, values), sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            pending = len(self.best_dw) + 1  # dev evals (C) still owed, this method included
            if time.time() + pending * self.dev_cost > self.deadline:
                entry["skipped_for_time"].append(values)
                continue
            pt, dw = self.point(method, values)
            entry["sweep"].append(pt)
            if dw is not None and _better(pt, best):
                best, self.best_dw[method] = pt, dw
        entry["chosen"] = best["values"]

    def _sweep_adamerging(self) -> None:
        """AdaMerging's knob: where the coefficients start (the paper's 0.3 was task arithmetic's
        best lam in its setting; here task arithmetic's own choice on the selection split)."""
        entry = self.methods.get("adamerging")
        if entry is None or "chosen" not in entry or not self.cfg.sweep:
            return
        ta = self.methods["task_arithmetic"]
        init = float(ta["chosen"].get("lam", full_values("task_arithmetic", {})["lam"]))
        if init == self.cfg.adamerging_init:
            return
        pending = len(self.best_dw) + 1
        if time.time() + entry["sweep"][0]["merge_s"] + pending * self.dev_cost > self.deadline:
            entry["skipped_for_time"].append({"init": init})
            return
        pt, dw = self.adamerging_point(init)
        entry["sweep"].append(pt)
        if dw is not None and _better(pt, entry["sweep"][0]):
            self.best_dw["adamerging"] = dw
            entry["chosen"], entry["info"] = pt["values"], pt["info"]

    def chosen_dev(self) -> None:
        """(C) dev at the chosen setting where it is not the default."""
        for method, dw in self.best_dw.items():
            entry = self.methods[method]
            self.dev(entry, "chosen", dw)
            self.log(f"{self.kind}/{method}: chosen {setting_label(entry['chosen'])}: dev norm "
                     f"{entry['norm_dev_chosen']['mean']} (default {entry['norm_dev_default']['mean']})")
        self.best_dw.clear()


def _method_order() -> list[str]:
    from deltakit.merge import list_merges

    return ["task_arithmetic"] + [m for m in list_merges() if m != "task_arithmetic" and m not in NOT_APPLICABLE]


def _better(p: dict, q: dict) -> bool:
    a, b = p["norm_select"]["mean"], q["norm_select"]["mean"]
    return a is not None and (b is None or a > b + 1e-12)


def full_values(method: str, values: dict) -> dict:
    """Every field of ``method``'s config at ``values`` (tuples as lists, as JSON has them)."""
    from deltakit.merge import build_config

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
            dataclasses.asdict(build_config(method, values)).items()}


def fmt_scores(scores: Mapping) -> str:
    return ", ".join(f"{t} {v['score']:.3f}" for t, v in scores.items())


def setting_label(values: dict) -> str:
    """``{"density": 0.2, "lam": 1.0}`` -> ``density=0.2 lam=1.0`` (weights by their first entry)."""
    if not values:
        return "default"
    parts = []
    for k, v in values.items():
        if k == "weights":
            k, v = "w", v[0]
        parts.append(f"{k}={v}")
    return " ".join(parts)
