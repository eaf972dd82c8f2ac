"""Store outages of any length are a pause, not a crash (issue 19, item 14).

MLflow: a real `mlflow server` on loopback (tests/test_report.py's helpers) is stopped
(SIGSTOP: it accepts connections and answers nothing) while a tiny sweep's trials run, with the
client's own retries off (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, 10 s request timeout), so only
kdsweep's patience (patience.py) stands between the outage and a failed sweep. Once the console
says it waits for MLflow the server continues (SIGCONT) and answers the requests it queued,
whose clients had given up: a run created by one of them is found, not created twice (tracking
`start_run`). The sweep must end normally with every run FINISHED, none twice, no metric step
twice. (Killing and restarting the server tests the same path, a minute slower here.)

Optuna: the wrapper at the Optuna boundary against a real SQLite storage whose folder vanishes
(a new connection cannot open the file) and comes back; a full sweep for it as well would
double this file's time for the same code path.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import (
    free_port,
    start_mlflow_server,
    start_sweep_cli,
    stop_group,
    tiny_spec_dict,
    wait_mlflow_healthy,
    wait_until,
)
from mlflow.tracking import MlflowClient

from sweep.credentials import redact
from sweep.patience import optuna_outage, optuna_storage, patiently


def test_an_mlflow_server_outage_past_the_clients_retries_is_waited_out(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = [start_mlflow_server(tmp_path, port)]
    try:
        wait_mlflow_healthy(url, started[0], tmp_path / "server.log")
        MlflowClient(
            url
        ).search_experiments()  # its database is set up: the sweep's first call is quick
        spec = tiny_spec_dict(
            tmp_path,
            name="outage",
            grid={"teacher_loss": ["ce"], "method": ["ce"], "train_attack": ["none"]},
            search_space={"lr": {"type": "float", "low": 0.01, "high": 0.1}},
            budget={"trials_per_cell": 2, "epochs": 2, "grace_period": 2},
            evaluation={
                "attacks": ["fgsm"],
                "val_attack": "fgsm",
                "val_examples": 60,
                "test_examples": 60,
            },
            resources={"cpus_per_trial": 1, "max_failures": 0},  # any failure would be final
            storage={"path": str(tmp_path / "sweeps"), "mlflow_tracking_uri": url},
        )
        (tmp_path / "outage.yaml").write_text(yaml.safe_dump(spec))
        log = tmp_path / "outage.log"
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        sweep = start_sweep_cli(tmp_path, "run", "outage.yaml", log=log, env=env)
        started.append(sweep)
        trials = tmp_path / "sweeps" / "outage" / "trials"
        wait_until("a trial's run", lambda: any(trials.glob("*/*/run.json")), sweep, log)
        os.killpg(started[0].pid, signal.SIGSTOP)  # the tracking server hangs, mid-trial
        wait_until(
            "the wait message",
            lambda: f"waiting for MLflow at {url}" in log.read_text(),
            sweep,
            log,
        )
        os.killpg(started[0].pid, signal.SIGCONT)
        sweep.wait(timeout=300)
        text = log.read_text()
        assert sweep.returncode == 0, text[-5000:]
        assert f"MLflow at {url} is back after" in text

        client = MlflowClient(url)
        (exp,) = [e for e in client.search_experiments() if e.name == "outage"]
        runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'")
        assert Counter(r.info.run_name for r in runs) == {"none.ce.none#0": 1, "none.ce.none#1": 1}
        assert {r.info.status for r in runs} == {"FINISHED"}
        (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
        assert parent.info.status == "FINISHED"
        for r in runs:
            for name in r.data.metrics:
                steps = [m.step for m in client.get_metric_history(r.info.run_id, name)]
                assert len(steps) == len(set(steps)), (r.info.run_name, name, steps)
    finally:
        os.killpg(started[0].pid, signal.SIGCONT)  # a stopped server would not hear SIGTERM
        for proc in reversed(started):
            stop_group(proc, grace=10)


def test_the_optuna_storage_waits_for_its_database_and_refuses_bad_requests_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    folder = tmp_path / "db"
    folder.mkdir()
    url = f"sqlite:///{folder / 'optuna.db'}"
    storage = optuna_storage(url)
    optuna.create_study(study_name="s", storage=storage)
    storage.engine.dispose()  # the next query opens a new connection: to a file gone
    shutil.move(folder, tmp_path / "away")
    back = threading.Timer(1.5, shutil.move, (tmp_path / "away", folder))
    back.start()
    try:
        study = optuna.load_study(study_name="s", storage=storage)  # waits until it is back
        study.tell(study.ask(), 1.0)
    finally:
        back.join()
    out = capsys.readouterr().out
    assert f"waiting for the Optuna storage at {url} (down 0 s)" in out
    assert f"the Optuna storage at {url} is back after" in out
    assert [t.value for t in study.trials] == [1.0]
    with pytest.raises(KeyError):  # no such study: not an outage, raised at once
        optuna.load_study(study_name="missing", storage=storage)


def test_only_connection_errors_are_outages_and_passwords_are_not_printed():
    import sqlalchemy.exc

    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed"))
    assert optuna_outage(lost)
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = lost
    assert optuna_outage(wrapped)
    assert not optuna_outage(ValueError("bad value"))
    assert not optuna_outage(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("dup")))
    said: list[str] = []
    calls = iter([lost, lost, "ok"])

    def flaky() -> str:
        got = next(calls)
        if isinstance(got, Exception):
            raise got
        return got

    waits: list[float] = []
    assert patiently(flaky, "db", optuna_outage, sleep=waits.append, say=said.append) == "ok"
    assert waits == [1.0, 2.0] and len(said) == 2  # one wait line, one "back" line
    assert redact("postgresql://kd:s3cret@db:5432/optuna") == "postgresql://kd:***@db:5432/optuna"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_mlflow_outages_are_connection_errors_and_5xx_not_bad_requests():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from sweep.tracking import mlflow_outage

    down = MlflowException(
        "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded"
    )
    assert mlflow_outage(down)
    assert mlflow_outage(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not mlflow_outage(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not mlflow_outage(KeyError("x"))
