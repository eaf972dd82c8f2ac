"""Resume and fault tolerance with real processes and real signals (issue 6).

Each test runs `sweep run` as a subprocess (its own session, so it and everything it starts can
be cleaned up), interrupts it for real (SIGKILL to the driver or to a trial's worker; SIGINT is
tested on a bucket in test_storage_s3.py), lets `sweep resume` or Tune's retry carry on, and
then checks the books: Tune, Optuna and MLflow agree trial for trial, nothing is RUNNING, no
metric step is logged twice, and trials that had finished were not trained again.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import optuna
import torch
import yaml
from conftest import (
    SWEEP,
    cli_env,
    start_sweep_cli,
    stop_group,
    sweep_cli,
    sweep_ok,
    tiny_spec_dict,
    wait_until,
)

from sweep.config import TrialConfig, cell_folder
from sweep.tracking import Tracker

EPOCHS = 4


def _spec(tmp_path: Path, name: str, **over) -> Path:
    settings = {
        "name": name,
        "teacher": {"epochs": 1},
        "grid": {"teacher_loss": ["ce"], "method": ["kd", "ard"], "train_attack": ["pgd"]},
        "budget": {"trials_per_cell": 2, "epochs": EPOCHS, "grace_period": EPOCHS},
        "evaluation": {
            "attacks": ["pgd5"],
            "val_attack": "pgd3",
            "val_examples": 60,
            "test_examples": 60,
        },
    }
    spec = tiny_spec_dict(tmp_path, **(settings | over))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Books:
    """Read-only views of one sweep's Tune, Optuna, MLflow and checkpoint records."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.name = name
        self.dir = tmp_path / "sweeps" / name
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def tracker(self) -> Tracker | None:
        if not (self.dir / "state.json").exists():
            return None
        return Tracker(self.uri, self.name)

    def runs(self, status: str | None = None) -> list:
        tracker = self.tracker()
        if tracker is None:
            return []
        return tracker.sweep_runs(self.name, "student", status=status)

    def epoch(self, key: str) -> int:
        path = self.dir / "trials" / key / "state.pt"
        if not path.exists():
            return 0
        try:
            return int(torch.load(path, weights_only=True)["epoch"])
        except Exception:  # being replaced right now
            return 0

    def in_progress(self) -> list[str]:
        """Trial keys with a checkpoint of an epoch before the last."""
        root = self.dir / "trials"
        keys = [f"{c.name}/{i.name}" for c in root.glob("*") for i in c.glob("*")]
        return [k for k in keys if 0 < self.epoch(k) < EPOCHS]

    def optuna_trials(self) -> list:
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.dir / 'optuna.db'}")
        out = []
        for s in optuna.get_all_study_summaries(storage):
            out += optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
        return out

    def tune_trials(self) -> list[dict]:
        """The trials of Tune's latest experiment snapshot: id, status, config."""
        (state,) = sorted((self.dir / "tune").glob("experiment_state-*.json"))[-1:]
        data = json.loads(state.read_text())
        out = []
        for trial_json, _runtime in data["trial_data"]:
            t = json.loads(trial_json)
            out.append({"status": t["status"], "config": t["config"]})
        return out

    def state_mtimes(self, runs: list) -> dict[str, int]:
        return {
            r.data.tags["config_key"]: (
                self.dir / "trials" / r.data.tags["config_key"] / "state.pt"
            )
            .stat()
            .st_mtime_ns
            for r in runs
        }


def _check_complete(books: Books, total: int, replaced: int = 0) -> None:
    """Every trial FINISHED exactly once and the three records agree. `replaced`: FAIL Optuna
    trials that were resumed to their end, each with its COMPLETE replacement (search.py)."""
    tune_trials = books.tune_trials()
    assert len(tune_trials) == total
    assert Counter(t["status"] for t in tune_trials) == {"TERMINATED": total}
    keys = Counter(TrialConfig.from_dict(t["config"]).config_key for t in tune_trials)
    assert all(n == 1 for n in keys.values()), keys  # no trial handed out twice

    runs = books.runs()
    assert len(runs) == total  # one MLflow run per Tune trial, no second run for a restart
    assert Counter(r.info.status for r in runs) == {"FINISHED": total}
    assert Counter(r.data.tags["config_key"] for r in runs) == keys

    trials = books.optuna_trials()
    assert len(trials) == total + replaced
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == total  # Optuna COMPLETE == MLflow FINISHED
    assert sum("replaces" in t.user_attrs for t in trials) == replaced

    client = books.tracker().client
    for r in runs:
        for metric in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, metric)]
            assert len(steps) == len(set(steps)), (r.info.run_name, metric, sorted(steps))
        history = client.get_metric_history(r.info.run_id, "val/clean_acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    parent = books.tracker().sweep_runs(books.name, "sweep")
    assert [p.info.status for p in parent] == ["FINISHED"]


def _resume(tmp_path: Path, name: str) -> str:
    """`sweep resume NAME` to its end (exit 0); returns what it printed."""
    log = tmp_path / "resume.log"
    resumed = start_sweep_cli(
        tmp_path, "resume", name, "--storage", str(tmp_path / "sweeps"), log=log
    )
    try:
        assert resumed.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        stop_group(resumed)
    return log.read_text()


def _kill_and_resume(tmp_path: Path, name: str) -> None:
    spec = _spec(tmp_path, name)
    books = Books(tmp_path, name)
    log = tmp_path / "run.log"
    proc = start_sweep_cli(tmp_path, "run", str(spec), log=log)
    try:
        wait_until(
            "one trial finished and another mid-way",
            lambda: books.runs("FINISHED") and books.in_progress(),
            proc,
            log,
        )
        finished = books.runs("FINISHED")
        mtimes = books.state_mtimes(finished)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a lost head node would
        rc = proc.wait(timeout=120)
    finally:
        stop_group(proc)  # what a preempted machine does to the rest of its Ray processes
    assert rc == -signal.SIGKILL, log.read_text()[-3000:]
    assert len(books.runs()) < 4  # it really was stopped before the end

    out2 = _resume(tmp_path, name)
    _check_complete(books, total=4)
    # finished trials were not trained again: their checkpoints untouched, their runs the same
    assert books.state_mtimes(finished) == mtimes
    done_before = {r.info.run_id: r.info.end_time for r in finished}
    after = {r.info.run_id: r.info.end_time for r in books.runs()}
    assert all(after[k] == v for k, v in done_before.items())
    assert "continuing from epoch" in out2  # the one mid-way went on from its checkpoint


def test_sigkill_of_the_driver_then_resume_finishes_every_trial_exactly_once(tmp_path):
    _kill_and_resume(tmp_path, "killed")


# SIGINT (Ctrl-C) then resume: tests/test_storage_s3.py, on a bucket (one sweep fewer here)


def test_sigkill_while_refitting_then_resume_finishes_the_refit_in_the_same_run(tmp_path):
    """`refit: true`: the driver is killed while a cell's best is being retrained on train +
    validation; resume leaves the tuning alone and continues the refit from its checkpoint, in
    its own run: one refit run, FINISHED, no epoch logged twice."""
    name = "refitkill"
    spec = _spec(
        tmp_path,
        name,
        grid={"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd"]},
        budget={"trials_per_cell": 1, "epochs": EPOCHS, "grace_period": EPOCHS},
        refit=True,
    )
    books = Books(tmp_path, name)
    refit_state = books.dir / "trials" / cell_folder("ce.kd.pgd") / "0" / "refit" / "state.pt"

    def refit_mid_way() -> bool:
        try:
            return 0 < torch.load(refit_state, weights_only=True)["epoch"] < EPOCHS
        except Exception:  # not there yet, or being replaced right now
            return False

    log = tmp_path / "run.log"
    proc = start_sweep_cli(tmp_path, "run", str(spec), log=log)
    try:
        wait_until("a refit mid-way", refit_mid_way, proc, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        stop_group(proc)
    tuned = books.runs("FINISHED")
    assert len(tuned) == 1  # tuning had ended

    out2 = _resume(tmp_path, name)
    assert "continuing from epoch" in out2
    tracker = books.tracker()
    refits = tracker.sweep_runs(name, "refit")
    assert len(refits) == 1 and refits[0].info.status == "FINISHED"
    assert refits[0].data.tags["refit_of"] == tuned[0].info.run_id
    steps = [m.step for m in tracker.client.get_metric_history(refits[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    assert [r.info.end_time for r in books.runs()] == [tuned[0].info.end_time]  # not retrained


def _trial_pid(books: Books) -> tuple[str, int] | None:
    """A RUNNING trial with a checkpoint mid-way, and the pid of the worker running it."""
    for key in books.in_progress():
        for r in books.runs("RUNNING"):
            if r.data.tags.get("config_key") == key and "worker_pid" in r.data.tags:
                return r.info.run_id, int(r.data.tags["worker_pid"])
    return None


def test_a_killed_worker_continues_from_its_checkpoint_in_the_same_run(tmp_path):
    spec = _spec(tmp_path, "worker")
    books = Books(tmp_path, "worker")
    log = tmp_path / "run.log"
    proc = start_sweep_cli(tmp_path, "run", str(spec), log=log)
    try:
        run_id, pid = wait_until("a trial mid-way", lambda: _trial_pid(books), proc, log)
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        stop_group(proc)
    out = log.read_text()
    _check_complete(books, total=4)
    run = books.tracker().client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["worker_pid"]) != pid  # a new worker finished it...
    assert "continuing from epoch" in out and run_id in out  # ...from the checkpoint
    assert "retrying from its checkpoint" in out


def test_a_trial_that_diverges_fails_with_reason_diverged_and_the_others_finish(tmp_path):
    spec = _spec(
        tmp_path,
        "nan",
        grid={"teacher_loss": ["ce"], "method": ["kd", "ce"], "train_attack": ["pgd"]},
        method_search_space={"ce": {"lr": 1.0e30}},  # the loss becomes inf / NaN at once
        budget={"trials_per_cell": 2, "epochs": 2, "grace_period": 2},
    )
    proc = sweep_cli(tmp_path, "run", str(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    books = Books(tmp_path, "nan")
    runs = books.runs()
    by_method = {m: [r for r in runs if r.data.tags["method"] == m] for m in ("kd", "ce")}
    assert len(by_method["kd"]) == 2 and len(by_method["ce"]) == 2
    assert {r.info.status for r in by_method["kd"]} == {"FINISHED"}
    for r in by_method["ce"]:
        assert r.info.status == "FAILED"
        assert r.data.tags["failure_reason"] == "diverged"
    states = Counter(t.state.name for t in books.optuna_trials())
    assert states == {"COMPLETE": 2, "FAIL": 2}
    statuses = Counter(t["status"] for t in books.tune_trials())
    assert statuses == {"TERMINATED": 2, "ERROR": 2}
    assert "sweep nan finished: 4 trials, 2 failed" in proc.stdout


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pid: int) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of `pid` and its descendants."""
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:  # Ray ships it on its own path, added when Ray is imported
        importlib.import_module("ray")
        psutil = importlib.import_module("psutil")
    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_sigterm_stops_like_ctrl_c_and_resume_finishes_an_errored_trial_too(tmp_path):
    """SIGTERM (`ray job stop`, Kubernetes) to the driver of a sweep started from a clean
    environment: while it runs, every socket of its process tree listens on loopback only
    (issue 19 item 1); a worker killed with no retries left makes its trial ERROR (Optuna FAIL,
    MLflow FAILED); SIGTERM then stops the sweep as Ctrl-C does (exit 130, no MLflow run left
    RUNNING); `sweep resume` finishes every trial once, the errored one included, and Optuna,
    MLflow and `sweep status` agree (item 9: Optuna COMPLETE == MLflow FINISHED)."""
    name = "term"
    spec = _spec(tmp_path, name, resources={"cpus_per_trial": 1, "max_failures": 0})
    books = Books(tmp_path, name)
    log = tmp_path / "run.log"
    env = cli_env()
    del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]  # as a user's shell: cli.main must set it
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*SWEEP, "run", str(spec)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        run_id, pid = wait_until("a trial mid-way", lambda: _trial_pid(books), proc, log)
        sockets = _listening(proc.pid)
        assert {n for n, _, _ in sockets} >= {"gcs_server", "raylet"}, sockets
        assert [s for s in sockets if s[1] not in LOOPBACK] == []
        os.kill(pid, signal.SIGKILL)  # max_failures 0: the trial errors for good
        wait_until(
            "the killed trial failed and another runs",
            lambda: books.runs("FAILED") and books.runs("RUNNING"),
            proc,
            log,
        )
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        stop_group(proc)
    first = log.read_text()
    assert rc == 130, first[-5000:]  # as Ctrl-C
    assert f"resume with: sweep resume {name}" in first
    assert not books.runs("RUNNING") and books.runs("KILLED"), first[-3000:]
    assert [r.info.status for r in books.tracker().sweep_runs(name, "sweep")] == ["KILLED"]
    (failed,) = books.runs("FAILED")
    assert failed.info.run_id == run_id and failed.data.tags["failure_reason"] == "worker_lost"
    states = Counter(t.state.name for t in books.optuna_trials())
    assert states["FAIL"] == 1

    _resume(tmp_path, name)
    _check_complete(books, total=4, replaced=1)
    assert books.tracker().client.get_run(run_id).info.status == "FINISHED"
    status = sweep_ok(tmp_path, "status", name, "--storage", str(tmp_path / "sweeps"))
    rows = [x.split() for x in status.splitlines() if x.startswith("ce.")]
    assert [(r[1], r[4], r[5]) for r in rows] == [("2", "0", "0")] * 2, status  # done failed todo
