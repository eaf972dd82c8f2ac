"""A sweep's identity and its stale records (issue 19 items 8 and 13).

A sweep name reused after its folder was deleted (the README's advice to start over) is another
sweep in the same MLflow experiment: every query selects by the sweep's own id, so its report,
status and Ctrl-C never see or touch the old sweep's runs. A driver that died (SIGKILL) leaves
RUNNING records; `sweep status --fix` closes them, refusing while the driver may still run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import yaml
from conftest import start_sweep_cli, stop_group, sweep_cli, sweep_ok, tiny_spec_dict, wait_until

from sweep.tracking import Tracker


def test_trackers_of_two_sweeps_of_one_name_see_and_close_only_their_own_runs(tmp_path):
    """Unit level, real MLflow: two sweeps named alike in one experiment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    old, new = Tracker(uri, "same", sweep_id="a" * 32), Tracker(uri, "same", sweep_id="b" * 32)
    tags = {"kind": "student", "sweep": "same"}
    old_run, new_run = old.start_run("x#0", tags=tags), new.start_run("x#0", tags=tags)
    assert [r.info.run_id for r in old.sweep_runs("same")] == [old_run]
    assert [r.info.run_id for r in new.sweep_runs("same")] == [new_run]
    assert new.close_running("same", "KILLED", "sweep interrupted") == [new_run]
    assert old.status(old_run) == "RUNNING" and new.status(new_run) == "KILLED"
    # a sweep from before ids (none in its state.json) is selected by its name, as then
    legacy = Tracker.of_state({"mlflow_tracking_uri": uri, "experiment": "same"})
    assert {r.info.run_id for r in legacy.sweep_runs("same")} == {old_run, new_run}
    assert Tracker.for_run(uri, new_run)[0].sweep_id == "b" * 32


def _state(sweep: Path) -> dict:
    return json.loads((sweep / "state.json").read_text())


def test_a_name_reused_after_deletion_is_a_new_sweep_and_status_fix_closes_its_stale_runs(
    tmp_path,
):
    name = "again"
    spec = tiny_spec_dict(
        tmp_path,
        name=name,
        teacher={"epochs": 1},
        grid={"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["none"]},
        budget={"trials_per_cell": 1, "epochs": 2, "grace_period": 2},
        evaluation={"attacks": ["fgsm"], "val_attack": "pgd3", "val_examples": 60},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = ["--storage", str(tmp_path / "sweeps")]
    sweep = tmp_path / "sweeps" / name

    sweep_ok(tmp_path, "run", str(path))
    first = Tracker.of_state(_state(sweep))
    first_runs = {r.info.run_id: r.info.status for r in first.sweep_runs(name)}
    assert Counter(first_runs.values()) == {"FINISHED": 3}  # sweep, teacher, student

    shutil.rmtree(sweep)  # start over, as the README says
    log = tmp_path / "run.log"
    proc = start_sweep_cli(tmp_path, "run", str(path), log=log)

    def new_trial_running() -> bool:
        if not (sweep / "state.json").exists() or not (sweep / "trials").exists():
            return False
        return bool(Tracker.of_state(_state(sweep)).sweep_runs(name, "student", status="RUNNING"))

    try:
        wait_until("the new sweep's trial running", new_trial_running, proc, log)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies: its records stay RUNNING
        proc.wait(timeout=120)
    finally:
        stop_group(proc)
    second = Tracker.of_state(_state(sweep))
    assert second.sweep_id != first.sweep_id
    stale = second.sweep_runs(name, status="RUNNING")
    assert {r.data.tags["kind"] for r in stale} == {"sweep", "student"}

    # refused while the driver may run (driver.json names a live process: this one)
    mark = sweep / "driver.json"
    saved = mark.read_text()
    mark.write_text(json.dumps({**json.loads(saved), "pid": os.getpid()}))
    refused = sweep_cli(tmp_path, "status", name, "--fix", *storage)
    assert refused.returncode == 2 and "may still be running" in refused.stderr, refused.stderr
    mark.write_text(saved)

    fixed = sweep_ok(tmp_path, "status", name, "--fix", *storage)
    assert "closed 2 stale MLflow runs (KILLED) and 1 Optuna trials (FAIL)" in fixed, fixed
    assert not second.sweep_runs(name, status="RUNNING")
    # the first sweep's runs, same name and experiment, are left as they were
    assert {r.info.run_id: r.info.status for r in first.sweep_runs(name)} == first_runs
    storage_url = f"sqlite:///{sweep / 'optuna.db'}"
    (trial,) = optuna.load_study(study_name=f"{name}/ce.kd.none", storage=storage_url).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["closed_because"] == "driver gone"

    # (that `sweep resume` then finishes a trial closed so: test_resume's SIGTERM test, whose
    # errored trial is FAIL in Optuna the same way)
    (run,) = second.sweep_runs(name, "student")
    assert run.info.status == "KILLED"
    report = sweep_ok(tmp_path, "report", name, *storage)
    assert "1 trials (0 finished)" in report, report
    rows = pd.read_parquet(sweep / "report" / "trials.parquet")
    assert list(rows["run_id"]) == [run.info.run_id]  # the new sweep's only
    status = sweep_ok(tmp_path, "status", name, *storage)
    (row,) = [x.split() for x in status.splitlines() if x.startswith("ce.kd.none")]
    assert row[1:6] == ["0", "0", "0", "1", "0"], status  # done, stopped, running, failed, todo
