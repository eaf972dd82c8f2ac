"""A tiny sweep through real Ray, Optuna and MLflow, driven by the CLI as a user would."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from conftest import sweep_cli, tiny_spec_dict
from mlflow.tracking import MlflowClient

from sweep.config import cell_folder
from sweep.spec import parse_spec

pytestmark = pytest.mark.integration


def _student_metrics(client, exp_id):
    runs = client.search_runs([exp_id], "tags.kind = 'student'", max_results=100)
    return runs, {
        (r.data.tags["cell"], r.data.params["seed"]): {
            k: v for k, v in r.data.metrics.items() if k.startswith("test/")
        }
        for r in runs
    }


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    # 0.5 CPU per trial: 4 trials start together on 2 cores and all ask for the 2 teachers;
    # both trials of a cell in the paired random phase, whose draws do not depend on timing
    # (README, Reproducibility: a modelled trial depends on which trials had finished)
    spec = tiny_spec_dict(
        tmp_path,
        resources={"cpus_per_trial": 0.5, "max_concurrent_trials": 4},
        optuna={"n_startup_trials": 2},
    )
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    first = sweep_cli(tmp_path, "run", "tiny.yaml")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = sweep_cli(tmp_path, "run", "tiny.yaml", "--name", "tiny-again")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return tmp_path, first, second


def test_every_trial_lands_in_mlflow_with_params_and_test_metrics(tiny_sweep):
    tmp_path, first, _ = tiny_sweep
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs, metrics = _student_metrics(client, exp.experiment_id)
    assert len(runs) == 4 * 2
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
    assert parent.info.status == "FINISHED"
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"temperature", "alpha", "teacher_loss", "method", "train_attack"} <= set(
            r.data.params
        )
        assert 1.0 <= float(r.data.params["temperature"]) <= 4.0
        assert {
            "test/clean_acc",
            "test/robust_acc/fgsm",
            "test/robust_acc/pgd20",
            "val/robust_acc",
        } <= set(r.data.metrics)
        assert 0 <= r.data.metrics["test/robust_acc/pgd20"] <= r.data.metrics["test/clean_acc"]
    assert {r.data.tags["cell"] for r in runs} == {
        "ce.kd.pgd",
        "mse.kd.pgd",
        "ce.ard.pgd",
        "mse.ard.pgd",
    }
    # one teacher run per distinct teacher, however many trials used it
    teachers = client.search_runs([exp.experiment_id], "tags.kind = 'teacher'")
    assert sorted(t.data.tags["teacher_loss"] for t in teachers) == ["ce", "mse"]
    assert all(t.data.tags["cache_event"] == "trained" for t in teachers)
    assert all("val/ncmi" in t.data.metrics for t in teachers)
    hashes = {t.data.tags["teacher_hash"] for t in teachers}
    assert {r.data.tags["teacher_hash"] for r in runs} == hashes
    link = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert link in first.stdout  # the runs table, not the UI's GenAI pages


def test_trials_starting_together_trained_each_teacher_exactly_once(tiny_sweep):
    tmp_path, _, _ = tiny_sweep
    starts, first_reports = [], []
    for d in (tmp_path / "sweeps" / "tiny" / "tune").glob("trainable*"):
        first = json.loads((d / "result.json").read_text().splitlines()[0])
        starts.append(first["timestamp"] - first["time_total_s"])
        first_reports.append(first["timestamp"])
    # at least 4 trials were running before any trial finished its first epoch, i.e. while
    # the teachers were being trained
    assert sum(s < min(first_reports) for s in starts) >= 4
    metas = list((tmp_path / "sweeps" / "teachers").glob("*/meta.json"))
    events = [[h["event"] for h in json.loads(m.read_text())["history"]] for m in metas]
    assert events == [["trained"], ["trained"]]


def test_no_test_set_metric_reaches_tune_asha_or_optuna(tiny_sweep):
    """Every result Tune passed to the scheduler and the searcher is in the trials' result.json;
    none may carry a test-split number (DESIGN §3.3), though the runs' MLflow records do."""
    tmp_path, _, _ = tiny_sweep
    seen: set[str] = set()
    for d in (tmp_path / "sweeps" / "tiny" / "tune").glob("trainable*"):
        for line in (d / "result.json").read_text().splitlines():
            seen |= set(json.loads(line))
    assert "val/robust_acc" in seen and "epoch" in seen
    assert not [k for k in seen if k.startswith(("test/", "final/"))]
    state = json.loads((tmp_path / "sweeps" / "tiny" / "state.json").read_text())
    storage = optuna.storages.RDBStorage(state["optuna"])
    for summary in optuna.get_all_study_summaries(storage):
        for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials:
            assert not [k for k in t.user_attrs if "test" in k]
            assert set(t.intermediate_values) <= {1, 2}  # epochs of the val objective
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=1)
    assert "test/clean_acc" in runs[0].data.metrics  # the test numbers exist, just not upstream


def test_each_cell_has_its_own_optuna_study_filled_to_budget(tiny_sweep):
    tmp_path, _, _ = tiny_sweep
    state = json.loads((tmp_path / "sweeps" / "tiny" / "state.json").read_text())
    storage = optuna.storages.RDBStorage(state["optuna"])
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == sorted(
        f"tiny/{c}" for c in ("ce.kd.pgd", "mse.kd.pgd", "ce.ard.pgd", "mse.ard.pgd")
    )
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).trials
        assert len(trials) == 2
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert all(set(t.params) == {"temperature", "alpha"} for t in trials)
        # Optuna saw validation values only: each equals the run's last val/robust_acc
        assert all(0 <= t.value <= 1 for t in trials)


def test_tune_ran_one_experiment_and_every_trial_checkpointed(tiny_sweep):
    tmp_path, _, _ = tiny_sweep
    sweep_dir = tmp_path / "sweeps" / "tiny"
    tune_dir = sweep_dir / "tune"
    trial_dirs = [d for d in tune_dir.iterdir() if d.is_dir() and d.name.startswith("trainable")]
    assert len(trial_dirs) == 8
    # the trials' own checkpoints (checkpoints.py), one per cell and index, at the last epoch
    states = sorted(sweep_dir.glob("trials/*/*/state.pt"))
    assert len(states) == 8
    cells = parse_spec(yaml.safe_load((tmp_path / "tiny.yaml").read_text())).cells()
    assert {p.parent.parent.name for p in states} == {cell_folder(c.key) for c in cells}


def test_same_file_and_seed_give_same_metrics_and_reuse_teachers(tiny_sweep):
    tmp_path, _, second = tiny_sweep
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, a = _student_metrics(client, client.get_experiment_by_name("tiny").experiment_id)
    again = client.get_experiment_by_name("tiny-again").experiment_id
    _, b = _student_metrics(client, again)
    assert a == b and len(a) == 8
    teachers = client.search_runs([again], "tags.kind = 'teacher'")
    assert len(teachers) == 2 and all(t.data.tags["from_cache"] == "true" for t in teachers)
    assert len(list((tmp_path / "sweeps" / "teachers").glob("*/teacher.pt"))) == 2


def test_status_reports_every_cell(tiny_sweep):
    tmp_path, _, _ = tiny_sweep
    r = sweep_cli(tmp_path, "status", "tiny", "--storage", str(tmp_path / "sweeps"))
    assert r.returncode == 0, r.stderr
    for cell in ("ce.kd.pgd", "mse.kd.pgd", "ce.ard.pgd", "mse.ard.pgd"):
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(cell))
        assert line.split()[1:6] == ["2", "0", "0", "0", "0"]


def test_evaluate_top_k_logs_the_full_suite_into_each_cells_best_run(tiny_sweep):
    tmp_path, _, _ = tiny_sweep
    storage = str(tmp_path / "sweeps")
    r = sweep_cli(tmp_path, "evaluate", "tiny", "--top", "1", "--storage", storage)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    done = client.search_runs([exp.experiment_id], "tags.final_eval = 'done'")
    assert sorted(d.data.tags["cell"] for d in done) == sorted(
        ["ce.kd.pgd", "mse.kd.pgd", "ce.ard.pgd", "mse.ard.pgd"]
    )
    assert all("final/robust_acc/pgd20" in d.data.metrics for d in done)
    again = sweep_cli(tmp_path, "evaluate", "tiny", "--top", "1", "--storage", storage)
    assert again.returncode == 0 and again.stdout.count("already evaluated") == 4
    bad = sweep_cli(tmp_path, "evaluate", "nosuch", "--storage", storage)
    assert bad.returncode == 2 and "no sweep 'nosuch'" in bad.stderr


def test_running_an_existing_sweep_again_is_refused(tiny_sweep):
    tmp_path, _, _ = tiny_sweep
    r = sweep_cli(tmp_path, "run", "tiny.yaml")
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--name" in r.stderr
    assert "sweep resume tiny --storage" in r.stderr  # how to go on, as well as start over


def test_every_registered_method_runs_one_epoch_through_the_sweep_path(tmp_path):
    from sweep.methods import METHODS

    methods = METHODS.names()
    spec = tiny_spec_dict(
        tmp_path,
        name="zoo",
        grid={"teacher_loss": ["ce"], "method": methods, "train_attack": ["pgd"]},
        teacher={"epochs": 1},
        teacher_sets={
            "robust": {"loss": "pgd_at", "params": {"steps": 2}},
            "ensemble": {"size": 2},
        },
        search_space={},
        budget={"trials_per_cell": 1, "epochs": 1, "grace_period": 1},
        evaluation={
            "attacks": ["pgd5"],
            "val_attack": "pgd2",
            "val_examples": 50,
            "test_examples": 50,
        },
        resources={"cpus_per_trial": 0.5},
    )
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(spec))
    r = sweep_cli(tmp_path, "run", "zoo.yaml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("zoo")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=100)
    finished = {r.data.tags["method"] for r in runs if r.info.status == "FINISHED"}
    # ce with pgd is pgd_at with pgd: the plan says so and runs that cell once, as pgd_at
    assert (
        "none.ce.pgd                  = none.pgd_at.pgd (the same loss and attack): run once"
        in (r.stdout)
    )
    assert finished == set(methods) - {"ce"}, {r.data.tags["method"]: r.info.status for r in runs}
    assert all("test/robust_acc/pgd5" in r.data.metrics for r in runs)


# Trials ASHA stops (pruned in Optuna, tested from their last checkpoint at the end of the
# sweep): tests/test_selection.py, on the sweep that also checks the selection rule.
