"""A hung trial does not hold its slot forever (issue 19, item 12).

The hang is real: the test holds the file lock of the kd trial's teacher (the lock trials take
to train or load a teacher, store.locked), so that trial blocks in get_teachers and reports
nothing, while the teacher-free ce baseline trains. With `budget.trial_timeout` the driver
kills the hung trial's worker and fails it with reason `timeout` in MLflow and Optuna; the
other trial finishes and the sweep ends normally. The watch's rules (timeout, stalls) are
checked by hand with a fake clock.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import sweep_cli, tiny_spec_dict

from sweep.layout import SweepLayout
from sweep.spec import BudgetSpec, Cell, parse_spec
from sweep.teachers import teacher_hash, teacher_identity
from sweep.tracking import Tracker
from sweep.watch import Watch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_attempt_past_the_timeout_is_overdue():
    clock = Clock()
    watch = Watch(30.0, clock=clock)
    watch.started("a")
    clock.now = 20.0
    watch.started("b")
    watch.reported("a")  # reporting does not extend the limit: it bounds the attempt
    clock.now = 31.0
    assert [tid for tid, _ in watch.overdue()] == ["a"]
    watch.ended("a")
    assert watch.overdue() == []
    assert Watch(None, clock=clock).overdue() == []  # no timeout: never overdue


def test_a_quiet_trial_is_named_once_per_quiet_spell():
    clock = Clock()
    watch = Watch(None, clock=clock, stall_factor=5, min_stall_s=1)
    watch.started("a")
    watch.started("b")
    for t in (3.0, 5.0, 7.0):  # epochs of 2 s after a 3 s setup
        clock.now = t
        watch.reported("a")
        watch.reported("b")
    assert watch.typical_epoch() == 2.0
    clock.now = 16.0
    watch.reported("a")
    clock.now = 17.5  # b quiet 10.5 s > 5 x 2 s
    assert [(tid, quiet) for tid, quiet, _ in watch.stalled()] == [("b", 10.5)]
    assert watch.stalled() == []  # said once
    watch.reported("b")
    clock.now = 40.0
    assert sorted(tid for tid, _, _ in watch.stalled()) == ["a", "b"]


def test_the_timeout_reads_seconds_or_a_duration_and_refuses_other_text():
    assert BudgetSpec(trial_timeout="30m").trial_timeout == 1800
    assert BudgetSpec(trial_timeout="90s").trial_timeout == 90
    assert BudgetSpec(trial_timeout=5).trial_timeout == 5
    assert BudgetSpec().trial_timeout is None
    with pytest.raises(ValueError, match="'soon' is not a duration; allowed"):
        BudgetSpec(trial_timeout="soon")
    with pytest.raises(ValueError, match="greater than 0"):
        BudgetSpec(trial_timeout=0)


TIMEOUT_S = 25


def test_a_hung_trial_times_out_fails_with_reason_and_the_sweep_goes_on(tmp_path: Path):
    spec = tiny_spec_dict(
        tmp_path,
        name="hang",
        teacher={"epochs": 1},
        grid={"teacher_loss": ["ce"], "method": ["kd", "ce"], "train_attack": ["none"]},
        budget={
            "trials_per_cell": 1,
            "epochs": 1,
            "grace_period": 1,
            "trial_timeout": f"{TIMEOUT_S}s",
        },
        evaluation={
            "attacks": ["fgsm"],
            "val_attack": "fgsm",
            "val_examples": 60,
            "test_examples": 60,
        },
        resources={"cpus_per_trial": 1, "max_failures": 0},
    )
    path = tmp_path / "hang.yaml"
    path.write_text(yaml.safe_dump(spec))
    parsed = parse_spec(spec)
    (teacher,) = parsed.cell_teachers(Cell("ce", "kd", "none"))
    lock = (
        Path(SweepLayout.of(parsed).teachers)
        / f"{teacher_hash(teacher_identity(parsed, teacher))}.lock"
    )
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the kd trial waits for it forever
        out = sweep_cli(tmp_path, "run", str(path), timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "ce.kd.none#0 ran past budget.trial_timeout (25s): stopped, failed" in log, log[-4000:]

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "hang")
    runs = {r.data.tags["method"]: r for r in tracker.sweep_runs("hang", "student")}
    assert runs["kd"].info.status == "FAILED"
    assert runs["kd"].data.tags["failure_reason"] == "timeout"
    assert runs["ce"].info.status == "FINISHED"
    layout = SweepLayout.of(parsed)
    kd = optuna.load_study(study_name=layout.study_name("ce.kd.none"), storage=layout.optuna_url)
    kd = kd.trials[0]
    assert kd.state == optuna.trial.TrialState.FAIL
    assert kd.user_attrs["failure_reason"] == "timeout"
    ce = optuna.load_study(study_name=layout.study_name("none.ce.none"), storage=layout.optuna_url)
    ce = ce.trials[0]
    assert ce.state == optuna.trial.TrialState.COMPLETE
