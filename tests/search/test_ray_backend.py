"""``deltakit search --backend ray`` (issue 18 item 4): the toy search's workers as two Ray Tune
trials on a local Ray (2 CPUs, no dashboard, 127.0.0.1). The budget is met with no trial lost or
counted twice, every stored value is the toy's known formula at the stored point, the command's
front table is the stored study's, and running the same command again adds nothing."""
from __future__ import annotations

import math
import time

import optuna
import pytest
import yaml

from deltakit.cli import main
from deltakit.search.driver import counts
from deltakit.search.report import front_table

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
optuna.logging.set_verbosity(optuna.logging.WARNING)

TRIALS = 6
# only lora's r is searched, around its declared default 8; alpha and lr fixed at their defaults
# (16, 5e-4), steps at 100: the toy's known optimum is r = 8, metric 1 - exp(-100 / 50), where
# its gap term 0.05 * log2(r / 8)^2 vanishes (objectives.toy_values)
SPEC = {"name": "toy-ray", "task": {"toy": True, "toy_seconds": 0.5}, "methods": {"lora": {"r": [2, 32], "alpha": 16.0}},
        "training": {"steps": 100, "lr": 5e-4}, "trials": TRIALS, "sampler": "random", "seed": 3}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def _toy_metric(r: int, steps: int) -> float:
    return (1 - 0.05 * math.log2(r / 8) ** 2) * (1 - math.exp(-steps / 50))


def test_ray_backend_meets_the_budget_and_resumes(local_ray, tmp_path, capsys):
    space = tmp_path / "toy.yaml"
    space.write_text(yaml.safe_dump(SPEC))
    url = f"sqlite:///{tmp_path / 's.db'}"
    command = ["search", str(space), "--storage", url, "--backend", "ray", "--workers", "2"]
    t0 = time.monotonic()
    assert main(command) == 0
    seconds = time.monotonic() - t0
    out = capsys.readouterr().out
    stored = optuna.load_study(study_name="toy-ray", storage=url)
    trials = stored.get_trials(deepcopy=False)
    # two workers deciding in the same instant may start one trial more, never fewer (driver.py)
    assert TRIALS <= counts(stored)["COMPLETE"] <= TRIALS + 1 and set(counts(stored)) == {"COMPLETE"}, seconds
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["point"]["worker"] for t in trials}) == 2  # both Tune trials ran search trials
    for t in trials:
        point = t.user_attrs["point"]
        r = point["settings"]["r"]
        assert point["settings"].get("alpha", 16.0) == 16.0 and point["training"]["lr"] == 5e-4
        assert t.values[0] == pytest.approx(_toy_metric(r, 100), rel=1e-12) and t.values[1] == r
        assert t.values[0] <= 1 - math.exp(-2) + 1e-12
    assert front_table(stored) in out and "2 worker(s) on Ray" in out  # what it printed is what is stored
    before = [(t.number, tuple(t.values)) for t in trials]

    assert main(command) == 0  # the same command again: the study is finished, nothing is added
    again = optuna.load_study(study_name="toy-ray", storage=url)
    assert [(t.number, tuple(t.values)) for t in again.get_trials(deepcopy=False)] == before
    assert front_table(again) in capsys.readouterr().out
