"""One rule for a cell's best configuration (sweep/selection.py), and every reader follows it:
the seed repeats, `sweep status`, `sweep report` and `sweep evaluate` name the same best."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import yaml
from conftest import sweep_cli, tiny_spec_dict
from mlflow.tracking import MlflowClient

from sweep.config import cell_folder
from sweep.selection import Candidate, best, rank
from sweep.spec import Objective

MAX = Objective(metric="val/robust_acc", mode="max")
MIN = Objective(metric="val/loss", mode="min")


def c(config, value, *, repeat=0, full=True, number=None):
    number = int(config) if number is None and config.isdigit() else number
    return Candidate(config, number, repeat, value, full)


def test_direction_and_ties_go_to_the_configuration_tried_first():
    cands = [c("2", 0.5), c("0", 0.7), c("1", 0.7)]
    assert [r.config for r in rank(cands, MAX)] == ["0", "1", "2"]
    assert [r.config for r in rank(cands, MIN)] == ["2", "0", "1"]


def test_an_early_stopped_trial_never_beats_full_budget_ones():
    """Its value is from an earlier epoch: not comparable while full-budget trials exist."""
    cands = [c("0", 0.6), c("1", 0.9, full=False), c("2", 0.5)]
    assert best(cands, MAX).config == "0"
    assert best([c("1", 0.9, full=False), c("3", 0.4, full=False)], MAX).config == "1"


def test_a_configuration_is_scored_by_its_tuned_trial_not_its_repeats():
    """Repeats estimate spread; re-ranking on their mean would reward never-repeated luck."""
    cands = [c("0", 0.8), c("0", 0.2, repeat=1), c("0", 0.3, repeat=2), c("1", 0.7)]
    top = best(cands, MAX)
    assert top.config == "0" and top.score == pytest.approx(0.8)
    assert [x.repeat for x in top.runs] == [0, 1, 2]  # the tuned run first: the one named
    # only repeats finished (the tuned run failed its test): their mean
    only = best([c("0", 0.2, repeat=1, number=0), c("0", 0.4, repeat=2, number=0)], MAX)
    assert only.score == pytest.approx(0.3)


def test_missing_values_and_an_empty_cell():
    assert best([], MAX) is None
    assert best([c("0", float("nan"))], MAX) is None


@pytest.mark.integration
def test_report_and_evaluate_name_the_same_best_run_of_every_cell(tmp_path):
    """A finished sweep whose cells have ASHA-stopped trials and a seed repeat of their best:
    the run `sweep report` names as a cell's best is the one `sweep evaluate --top 1` evaluates
    first, it is the run the repeat re-ran, and `sweep status` shows its value.

    The same sweep checks the trials ASHA stops (trials one at a time, halving after epoch 1):
    a trial worse than the median at epoch 1 is stopped there, pruned in Optuna, and still gets
    its test suite run from its epoch-1 checkpoint at the end of the sweep (its MLflow run
    FINISHED, 1 epoch trained, tested once at that epoch)."""
    spec = tiny_spec_dict(
        tmp_path,
        name="pick",
        grid={"teacher_loss": ["ce"], "method": ["kd", "ce"], "train_attack": ["pgd"]},
        teacher={"epochs": 1},
        train_attack={"pgd": {"steps": 1}},
        search_space={"lr": {"type": "log_float", "low": 1e-4, "high": 0.3}},
        budget={"trials_per_cell": 4, "epochs": 2, "grace_period": 1, "reduction_factor": 2},
        repeats=1,
        evaluation={
            "attacks": ["fgsm"],
            "val_attack": "fgsm",
            "val_examples": 100,
            "test_examples": 50,
        },
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    (tmp_path / "pick.yaml").write_text(yaml.safe_dump(spec))
    run = sweep_cli(tmp_path, "run", "pick.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    assert "pick finished: 10 trials, 0 failed" in run.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pick")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=100)
    assert len(runs) == 10 and all(x.info.status == "FINISHED" for x in runs)
    by_name = {r.info.run_name: r for r in runs}
    assert sum("repeat" in r.data.tags for r in runs) == 2
    state = json.loads((tmp_path / "sweeps" / "pick" / "state.json").read_text())
    n_stopped = 0
    for cell in ("ce.kd.pgd", "none.ce.pgd"):
        trials = tmp_path / "sweeps" / "pick" / "trials" / cell_folder(cell)
        stopped = {
            int(d.name)
            for d in trials.iterdir()
            if (d / "outcome.json").exists()
            and json.loads((d / "outcome.json").read_text())["status"] == "stopped"
        }
        n_stopped += len(stopped)
        study = optuna.load_study(study_name=f"pick/{cell}", storage=state["optuna"])
        pruned = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
        assert pruned == stopped
        for k in range(4):
            r = by_name[f"{cell}#{k}"]
            epochs = 1 if k in stopped else 2
            assert r.data.tags["epochs_trained"] == str(epochs)
            assert {"test/clean_acc", "test/robust_acc/fgsm"} <= set(r.data.metrics)
            history = client.get_metric_history(r.info.run_id, "test/clean_acc")
            assert [m.step for m in history] == [epochs]  # tested once, at the epoch it reached
    assert n_stopped, "no trial was stopped: the test no longer exercises ASHA"
    assert f"testing {n_stopped} trials stopped early by ASHA" in run.stdout

    report = sweep_cli(tmp_path, "report", "pick")
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    summary = (tmp_path / "sweeps" / "pick" / "report" / "summary.md").read_text()
    named = {}
    for cell in ("ce.kd.pgd", "none.ce.pgd"):
        line = next(x for x in summary.splitlines() if x.startswith(f"| {cell} |"))
        named[cell] = by_name[re.findall(r"`([^`]+)`", line)[-1]]

    ev = sweep_cli(tmp_path, "evaluate", "pick", "--top", "1", "--attacks", "fgsm")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    first = {}
    for m in re.finditer(r"^\[\d+/\d+\] (\S+) ([0-9a-f]{8}): ", ev.stdout, re.M):
        first.setdefault(m.group(1), m.group(2))

    status = sweep_cli(tmp_path, "status", "pick").stdout
    for cell, run_ in named.items():
        assert first[cell] == run_.info.run_id[:8]
        assert "repeat" not in run_.data.tags and run_.data.tags["epochs_trained"] == "2"
        # the sweep re-ran this configuration with a new seed: the same rule chose it
        (rep,) = [r for r in runs if r.data.tags.get("cell") == cell and "repeat" in r.data.tags]
        assert rep.data.tags["config_key"] == run_.data.tags["config_key"]
        # and it is the best full-budget (COMPLETE) trial of the cell's study
        study = optuna.load_study(study_name=f"pick/{cell}", storage=state["optuna"])
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        top = max(done, key=lambda t: (t.value, -t.number))
        assert int(run_.data.tags["optuna_trial"]) == top.number
        row = next(x for x in status.splitlines() if x.startswith(cell))
        assert f"{top.value:.4f}" in row
        evaluated = client.get_run(run_.info.run_id)
        assert evaluated.data.tags.get("final_eval") == "done"
