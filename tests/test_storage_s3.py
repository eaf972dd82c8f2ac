"""A sweep whose storage is an S3 bucket (issue 7): Tune's experiment, the trials' checkpoints,
the teacher cache, sweep.yaml and state.json all go through pyarrow's S3 filesystem, and a sweep
interrupted there with SIGINT (Ctrl-C) is resumed from there. This is also the suite's SIGINT
test (test_resume.py does SIGKILL of the driver and of a worker on a local folder).

The bucket is served by moto's S3 server, a separate process on 127.0.0.1 speaking the S3 HTTP
API: pyarrow's real S3 client (the AWS C++ SDK) talks to it exactly as to AWS, credentials from
the environment as on a cluster node. Optuna and MLflow stay in local SQLite files (on a cluster
they are PostgreSQL and a tracking server; SQLite cannot live in a bucket, which the spec
refuses — tested in test_spec)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter

import pytest
import yaml
from conftest import (
    moto_s3,
    start_sweep_cli,
    stop_group,
    sweep_cli,
    tiny_spec_dict,
    wait_until,
)

pytestmark = pytest.mark.integration

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET = "kdsweep-test"
# A trial is interrupted mid-way with two epochs still to go: while Tune writes its last
# snapshot to the bucket after Ctrl-C, a trial with one epoch to go could finish it (seen on a
# loaded machine), and then no run is left to be marked KILLED.
EPOCHS = 4


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on loopback and the environment a cluster node would have."""
    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as (env, client):
        yield env, client


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def _finished_and_mid_trial(env: dict, client, prefix: str) -> bool:
    """A student run has FINISHED, and another is RUNNING with its checkpoint in the bucket and
    two epochs still to go. (Trials started together finish together: a finished one does not
    mean another is mid-way.)"""
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("s3sweep")
    if exp is None:
        return False
    students = "tags.kind = 'student' and attributes.status = "
    if not mlflow.search_runs([exp.experiment_id], students + "'FINISHED'"):
        return False
    running = mlflow.search_runs([exp.experiment_id], students + "'RUNNING'")
    states = set(_keys(client, prefix + "trials/"))
    for r in running:
        steps = [m.step for m in mlflow.get_metric_history(r.info.run_id, "val/clean_acc")]
        checkpoint = f"{prefix}trials/{r.data.tags.get('config_key')}/state.pt"
        if steps and max(steps) <= EPOCHS - 2 and checkpoint in states:
            return True
    return False


def _ok(r: subprocess.CompletedProcess) -> str:
    """The whole output of a `sweep` command that must have succeeded."""
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    return out


def test_a_sweep_on_s3_is_interrupted_and_resumed_from_the_bucket(s3, tmp_path):
    env, client = s3
    local = tmp_path / "work"
    local.mkdir()
    spec = tiny_spec_dict(
        tmp_path,
        name="s3sweep",
        teacher={"epochs": 1},
        grid={"teacher_loss": ["ce"], "method": ["kd", "ard"], "train_attack": ["pgd"]},
        budget={"trials_per_cell": 2, "epochs": EPOCHS, "grace_period": EPOCHS},
        evaluation={
            "attacks": ["pgd5"],
            "val_attack": "pgd3",
            "val_examples": 60,
            "test_examples": 60,
        },
    )
    del spec["storage"]  # everything from the environment, as on a cluster node
    (local / "s3sweep.yaml").write_text(yaml.safe_dump(spec))
    env = env | {
        "KDSWEEP_STORAGE": f"s3://{BUCKET}/sweeps",
        "KDSWEEP_OPTUNA": f"sqlite:///{tmp_path / 'optuna.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    prefix = "sweeps/s3sweep/"
    log = tmp_path / "run.log"
    proc = start_sweep_cli(local, "run", "s3sweep.yaml", log=log, env=env)
    try:  # interrupt once a trial has finished and another is mid-way with a checkpoint there
        wait_until(
            "a trial finished and another mid-way",
            lambda: _finished_and_mid_trial(env, client, prefix),
            proc,
            log,
            timeout=400,
        )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        stop_group(proc)
    first = log.read_text()
    assert proc.returncode == 130, first[-5000:]
    assert f"resume with: sweep resume s3sweep --storage s3://{BUCKET}/sweeps" in first

    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("s3sweep")

    def students(status=None):
        runs = mlflow.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=100)
        return [r for r in runs if status is None or r.info.status == status]

    # an interrupted sweep shows nothing as RUNNING: those runs are KILLED until resumed
    assert not students("RUNNING") and students("KILLED")
    assert len(students("FINISHED")) < 4  # it really was stopped before the end

    keys = _keys(client, prefix)
    assert {prefix + "sweep.yaml", prefix + "state.json"} <= set(keys)
    assert any(k.startswith(prefix + "tune/") for k in keys)  # Tune's experiment state
    # the teacher cache is in the bucket too; its lock guards one machine only, so the driver
    # had the (one, distinct) teacher trained before the trials: trained once, then loaded
    assert "teachers ready: ce (" in first
    metas = [k for k in _keys(client, "sweeps/teachers/") if k.endswith("/meta.json")]
    assert len(metas) == 1
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=metas[0])["Body"].read())
    assert [h["event"] for h in meta["history"]] == ["trained"]
    assert not (local / "sweeps").exists()  # nothing went to the driver's disk

    # resume from the bucket: KDSWEEP_STORAGE is the default --storage
    out = _ok(sweep_cli(local, "resume", "s3sweep", env=env))
    assert "sweep s3sweep finished: 4 trials, 0 failed" in out, out[-5000:]
    assert "continuing from epoch" in out  # a trial went on from its checkpoint in the bucket
    runs = students()
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert Counter(r.data.tags["config_key"] for r in runs).most_common(1)[0][1] == 1
    for r in runs:  # every epoch logged once, across the interruption
        steps = [m.step for m in mlflow.get_metric_history(r.info.run_id, "val/clean_acc")]
        assert steps == list(range(1, EPOCHS + 1)), (r.info.run_name, steps)
        key = r.data.tags["config_key"]
        assert f"{prefix}trials/{key}/state.pt" in _keys(client, prefix + "trials/")
    state = json.loads(client.get_object(Bucket=BUCKET, Key=prefix + "state.json")["Body"].read())
    assert state["optuna"] == env["KDSWEEP_OPTUNA"]

    # status and report read the sweep from the bucket; the report is written locally
    status = _ok(sweep_cli(local, "status", "s3sweep", env=env))
    rows = [x.split() for x in status.splitlines() if x.startswith(("ce.kd.pgd", "ce.ard.pgd"))]
    assert [r[1] for r in rows] == ["2", "2"], status  # done per cell
    report = _ok(sweep_cli(local, "report", "s3sweep", env=env))
    assert "nothing missing" in report
    assert (local / "s3sweep-report" / "trials.parquet").stat().st_size > 0
