"""`repeats: N` and `refit` end to end: a real sweep re-runs each cell's best configuration with
N new seeds (real Ray, Optuna, MLflow), and `sweep report` / `sweep status` count them as one
configuration; with `refit: true` it then retrains each best on train + validation."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
import yaml
from conftest import sweep_ok, tiny_spec_dict
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration

REPEATS = 2


@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """2 cells (kd with a ce teacher, and plain ce) x 2 tuned trials + 2 repeats each."""
    tmp = tmp_path_factory.mktemp("repeats")
    spec = tiny_spec_dict(
        tmp,
        name="rep2",
        grid={"teacher_loss": ["ce"], "method": ["kd", "ce"], "train_attack": ["pgd"]},
        search_space={"lr": {"type": "log_float", "low": 0.01, "high": 0.2}},
        repeats=REPEATS,
        refit=True,
        evaluation={
            "attacks": ["fgsm"],
            "val_attack": "pgd5",
            "val_examples": 100,
            "test_examples": 100,
        },
    )
    (tmp / "rep2.yaml").write_text(yaml.safe_dump(spec))
    run = sweep_ok(tmp, "run", "rep2.yaml")
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rep2")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=100)
    state = json.loads((tmp / "sweeps" / "rep2" / "state.json").read_text())
    return tmp, run, runs, state


def test_each_cells_best_configuration_is_rerun_with_new_seeds(repeated):
    tmp, out, runs, state = repeated
    assert "2 cells x 2 trials + 2 seed repeats of each cell's best = 8 trials" in out
    assert "sweep rep2 finished: 8 trials, 0 failed" in out
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    storage = optuna.storages.RDBStorage(state["optuna"])
    for cell in ("ce.kd.pgd", "none.ce.pgd"):
        study = optuna.load_study(study_name=f"rep2/{cell}", storage=storage)
        assert len(study.trials) == 2  # repeats are not Optuna trials
        best = max(study.trials, key=lambda t: (t.value, -t.number))
        mine = [r for r in runs if r.data.tags["cell"] == cell]
        tuned = {int(r.data.tags["optuna_trial"]): r for r in mine if "repeat" not in r.data.tags}
        repeats = sorted(
            (r for r in mine if "repeat" in r.data.tags), key=lambda r: r.data.tags["repeat"]
        )
        assert sorted(tuned) == [0, 1]
        assert [r.data.tags["repeat"] for r in repeats] == [str(k + 1) for k in range(REPEATS)]
        source = tuned[best.number]
        seeds = {r.data.params["seed"] for r in mine}
        assert len(seeds) == 2 + REPEATS  # every run of the cell has its own seed
        for k, r in enumerate(repeats, start=1):
            assert r.data.tags["config_key"] == source.data.tags["config_key"]
            assert r.info.run_name == f"{source.info.run_name}.r{k}"
            assert float(r.data.params["lr"]) == pytest.approx(best.params["lr"])
            assert r.data.params["lr"] == source.data.params["lr"]
            assert int(r.data.tags["epochs_trained"]) == 2  # never stopped early
            assert "test/clean_acc" in r.data.metrics
            key = r.data.tags["config_key"]
            assert (tmp / "sweeps" / "rep2" / "trials" / key / f"repeat-{k}" / "state.pt").exists()
        # different seeds, different students: the repeats measure spread, not one number thrice
        accs = {r.data.metrics["val/loss"] for r in [source, *repeats]}
        assert len(accs) == 1 + REPEATS


def test_report_and_status_count_the_repeats_as_one_configuration(repeated):
    tmp, _, runs, _ = repeated
    out = sweep_ok(tmp, "report", "rep2")
    assert "nothing missing" in out
    report = tmp / "sweeps" / "rep2" / "report"
    df = pd.read_parquet(report / "trials.parquet")
    assert len(df) == 8 and sorted(df["repeat"].fillna(0).astype(int)) == [0] * 4 + [1, 1, 2, 2]
    summary = (report / "summary.md").read_text()
    assert "2 cells × 2 trials + 2 seed repeats of each cell's best" in summary
    for cell in ("ce.kd.pgd", "none.ce.pgd"):
        group = df[(df["cell"] == cell) & (df["repeat"].fillna(0) > 0)]
        (config,) = set(group["config"])
        rows = df[df["config"] == config]
        assert len(rows) == 1 + REPEATS
        mean = rows["test/clean_acc"].mean()
        line = next(x for x in summary.splitlines() if x.startswith(f"| {cell} |"))
        assert f"| {1 + REPEATS} |" in line  # n: the tuned run and its repeats
        assert f"| {100 * mean:.2f} ± " in line  # their mean (and spread)
    status = sweep_ok(tmp, "status", "rep2")
    rows = [x for x in status.splitlines() if x.startswith(("ce.kd.pgd", "none.ce.pgd"))]
    assert len(rows) == 2 and all(f"{REPEATS}/{REPEATS}" in x.split() for x in rows)


def test_refit_retrains_each_cells_best_on_train_plus_validation(repeated):
    tmp, out, runs, state = repeated
    assert "refitting the best configuration of 2 cells on train + validation" in out
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rep2")
    refits = client.search_runs([exp.experiment_id], "tags.kind = 'refit'", max_results=100)
    assert sorted(r.data.tags["cell"] for r in refits) == ["ce.kd.pgd", "none.ce.pgd"]
    storage = optuna.storages.RDBStorage(state["optuna"])
    by_id = {r.info.run_id: r for r in runs}
    for r in refits:
        cell = r.data.tags["cell"]
        study = optuna.load_study(study_name=f"rep2/{cell}", storage=storage)
        best = max(study.trials, key=lambda t: (t.value, -t.number))
        tuned = by_id[r.data.tags["refit_of"]]  # the tuned run it retrains, linked
        assert "repeat" not in tuned.data.tags and tuned.data.tags["cell"] == cell
        assert int(tuned.data.tags["optuna_trial"]) == best.number
        assert r.info.status == "FINISHED" and r.data.tags["data"] == "train+val"
        assert r.info.run_name == f"{tuned.info.run_name}.refit"
        assert r.data.params["lr"] == tuned.data.params["lr"]
        assert r.data.params["seed"] == tuned.data.params["seed"]
        assert "test/clean_acc" in r.data.metrics and "train/loss" in r.data.metrics
        assert not any(k.startswith("val/") for k in r.data.metrics)  # val was trained on
        # the same configuration and seed on more data: another student
        assert r.data.metrics["train/loss"] != tuned.data.metrics["train/loss"]
        assert r.info.run_name in out  # a line per refit


def test_the_report_shows_each_refit_and_evaluate_tests_it_with_its_configuration(repeated):
    tmp, _, _, _ = repeated
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rep2")
    refits = client.search_runs([exp.experiment_id], "tags.kind = 'refit'", max_results=100)
    sweep_ok(tmp, "report", "rep2")
    summary = (tmp / "sweeps" / "rep2" / "report" / "summary.md").read_text()
    section = summary.split("## Refit on train + validation", 1)[1].split("\n## ", 1)[0]
    for r in refits:
        line = next(x for x in section.splitlines() if x.startswith(f"| {r.data.tags['cell']} |"))
        assert f"`{r.info.run_name}`" in line
        assert f"| {100 * r.data.metrics['test/clean_acc']:.2f} |" in line
    out = sweep_ok(tmp, "evaluate", "rep2", "--top", "1", "--attacks", "fgsm", "--examples", "50")
    for r in refits:  # the refit first, then the tuned run and its repeats
        assert f"{r.data.tags['cell']} {r.info.run_id[:8]}" in out
        again = client.get_run(r.info.run_id)
        assert again.data.tags["final_eval"] == "done" and "final/clean_acc" in again.data.metrics
