"""A two-objective sweep end to end on digits (real Ray, Optuna, MLflow): ASHA ranks by the
declared weighted sum, every trial that ended is told to the sampler with its values (none
PRUNED), each cell keeps its Pareto front, and the seed repeats, `sweep report` and `sweep
evaluate` all choose the configuration the declared rule (`choose: knee`) picks. The sweep has
seed repeats, so its report also carries the paired teacher-loss gains with CIs, the heatmap and
the importances."""

from __future__ import annotations

import json
import math
import re

import optuna
import pytest
import yaml
from conftest import sweep_ok, tiny_spec_dict
from mlflow.tracking import MlflowClient

from sweep.config import cell_folder

pytestmark = pytest.mark.integration

CELLS = ("ce.kd.none", "mse.kd.none")
TRIALS, REPEATS = 4, 3


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mo")
    spec = tiny_spec_dict(
        tmp,
        name="mo",
        grid={"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["none"]},
        teacher={"epochs": 1},
        objective=[{"metric": "val/clean_acc"}, {"metric": "val/robust_acc"}],
        choose={"rule": "knee"},
        budget={
            "trials_per_cell": TRIALS,
            "epochs": 2,
            "grace_period": 1,
            "reduction_factor": 2,
            "asha_weights": {"val/clean_acc": 0.5, "val/robust_acc": 0.5},
        },
        repeats=REPEATS,
        evaluation={
            "attacks": ["fgsm"],
            "val_attack": "fgsm",
            "val_examples": 100,
            "test_examples": 50,
        },
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    (tmp / "mo.yaml").write_text(yaml.safe_dump(spec))
    run = sweep_ok(tmp, "run", "mo.yaml")
    report = sweep_ok(tmp, "report", "mo")
    ev = sweep_ok(tmp, "evaluate", "mo", "--top", "1", "--attacks", "fgsm")
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mo")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=100)
    state = json.loads((tmp / "sweeps" / "mo" / "state.json").read_text())
    studies = {
        c: optuna.load_study(study_name=f"mo/{c}", storage=state["optuna"]).trials for c in CELLS
    }
    return tmp, run, report, ev, runs, studies


def _knee(points: dict[int, tuple[float, float]]) -> int:
    """The rule, written out again: the non-dominated points, each objective scaled to [0, 1]
    over them, the one nearest (1, 1); ties to the lower trial number."""
    front = {
        k: p
        for k, p in points.items()
        if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())
    }
    lo = [min(p[i] for p in front.values()) for i in range(2)]
    hi = [max(p[i] for p in front.values()) for i in range(2)]
    scaled = {
        k: [1.0 if hi[i] == lo[i] else (p[i] - lo[i]) / (hi[i] - lo[i]) for i in range(2)]
        for k, p in front.items()
    }
    return min(scaled, key=lambda k: (math.dist(scaled[k], (1.0, 1.0)), k))


def test_every_trial_that_ended_is_told_to_the_sampler_with_its_values(swept):
    tmp, run, _, _, runs, studies = swept
    assert f"2 cells x {TRIALS} trials + {REPEATS} seed repeats" in run
    assert f"sweep mo finished: {2 * (TRIALS + REPEATS)} trials, 0 failed" in run
    stopped_total = 0
    for cell, trials in studies.items():
        assert len(trials) == TRIALS
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # none PRUNED
        folder = tmp / "sweeps" / "mo" / "trials" / cell_folder(cell)
        stopped = {
            int(d.name)
            for d in folder.iterdir()
            if (d / "outcome.json").exists()
            and json.loads((d / "outcome.json").read_text())["status"] == "stopped"
        }
        stopped_total += len(stopped)
        for t in trials:
            assert len(t.values) == 2
            assert t.user_attrs["epochs_trained"] == (1 if t.number in stopped else 2)
    assert stopped_total, "no trial was stopped: the test no longer exercises ASHA"


def test_repeats_report_and_evaluate_choose_the_knee_of_each_cells_front(swept):
    tmp, _, _, ev, runs, studies = swept
    summary = (tmp / "sweeps" / "mo" / "report" / "summary.md").read_text()
    first_evaluated = {}
    for m in re.finditer(r"^\[\d+/\d+\] (\S+) ([0-9a-f]{8}): ", ev, re.M):
        first_evaluated.setdefault(m.group(1), m.group(2))
    for cell, trials in studies.items():
        full = {t.number: tuple(t.values) for t in trials if t.user_attrs["epochs_trained"] == 2}
        chosen = _knee(full)
        mine = [r for r in runs if r.data.tags["cell"] == cell]
        tuned = next(
            r
            for r in mine
            if r.data.tags["optuna_trial"] == str(chosen) and "repeat" not in r.data.tags
        )
        reps = [r for r in mine if "repeat" in r.data.tags]
        assert len(reps) == REPEATS
        assert {r.data.tags["config_key"] for r in reps} == {tuned.data.tags["config_key"]}
        assert first_evaluated[cell] == tuned.info.run_id[:8]
        star = next(x for x in summary.splitlines() if x.startswith(f"| {cell} |") and "★" in x)
        assert f"`{tuned.info.run_name}`" in star


def test_the_report_answers_with_paired_gains_intervals_fronts_and_importances(swept):
    tmp, _, report, _, _, _ = swept
    out = tmp / "sweeps" / "mo" / "report"
    summary = (out / "summary.md").read_text()
    assert "## Pareto front per cell (validation)" in summary
    row = next(
        x for x in summary.splitlines() if x.startswith("| none ") or "mse" in x and "[" in x
    )
    ci = re.search(rf"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\] \(n={REPEATS}\)", summary)
    assert ci, row
    for name in ("gains.csv", "pareto.png", "importances.csv"):
        assert (out / name).stat().st_size > 0, name
    assert list(out.glob("gains*.png")), "no heatmap"
    assert "importance" in summary.lower()
