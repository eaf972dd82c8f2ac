"""One trial in plain Python (no Ray) against a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_context, runs_of, trial_config

from sweep.checkpoints import STOPPED
from sweep.context import get_splits
from sweep.spec import Cell
from sweep.teacher_defs import TeacherSetsSpec, teacher_set
from sweep.teachers import get_teacher, get_teachers
from sweep.training import Diverged
from sweep.trial import TrialFailed, finalize_from_state, run_trial

CONFIG = trial_config()  # ce.kd.pgd, temperature 2, alpha 0.5, seed 0, Optuna trial 0


class _Stop(BaseException):
    """What Tune's stop looks like from inside the trainable: the function is abandoned."""


def test_trial_reports_validation_only_and_tests_once_at_the_end(tmp_path):
    ctx = make_context(tmp_path)
    reports = []
    run_trial(ctx, CONFIG, lambda m, s: reports.append((m, s)))
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    for m, _ in reports:  # nothing from the test split may reach Tune/Optuna/ASHA
        assert all(k.startswith(("val/", "train/")) or k == "epoch" for k in m)
    tracker = ctx.tracker()
    (run,) = runs_of(ctx)
    assert run.info.status == "FINISHED"
    assert {"test/clean_acc", "test/robust_acc/fgsm", "test/robust_acc/pgd20"} <= set(
        run.data.metrics
    )
    assert run.data.params["temperature"] == "2.0" and run.data.params["alpha"] == "0.5"
    history = tracker.client.get_metric_history(run.info.run_id, "val/robust_acc")
    assert sorted(h.step for h in history) == [1, 2]
    assert len(runs_of(ctx, "teacher")) == 1
    arts = {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
    assert {"student.pt", "sweep.yaml"} <= arts
    # said out loud on the run: how the method and the teacher loss were checked
    from sweep.methods import METHODS
    from sweep.teacher_losses import TEACHER_LOSSES

    assert run.data.tags["method_fidelity"] == METHODS.get("kd").fidelity.tag()
    assert run.data.tags["teacher_fidelity"] == TEACHER_LOSSES.get("ce").fidelity.tag()
    assert run.data.tags["paper_default"] == "false"  # T 2, alpha 0.5: not Hinton's setting


def test_same_config_and_seed_give_the_same_metrics(tmp_path):
    a, b = [], []
    run_trial(make_context(tmp_path / "a"), CONFIG, lambda m, s: a.append(m))
    run_trial(make_context(tmp_path / "b"), CONFIG, lambda m, s: b.append(m))
    assert a == b
    other = trial_config(seed=1)
    c = []
    run_trial(make_context(tmp_path / "c"), other, lambda m, s: c.append(m))
    assert c != a


def _stopped_after_first_epoch(ctx):
    """Run a trial that is stopped at its first report; return the checkpoint state."""
    states = []

    def report(metrics, state):
        states.append(state)
        raise _Stop

    with pytest.raises(_Stop):
        run_trial(ctx, CONFIG, report)
    return states[0]


def test_trial_stopped_early_is_tested_from_its_checkpoint(tmp_path):
    ctx = make_context(tmp_path)
    state = _stopped_after_first_epoch(ctx)
    (run,) = runs_of(ctx)
    assert run.info.status == "RUNNING" and "test/clean_acc" not in run.data.metrics
    finalize_from_state(ctx, CONFIG, state)
    run = ctx.tracker().client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["epochs_trained"] == "1"
    assert "test/robust_acc/pgd20" in run.data.metrics


def test_resumed_trial_continues_the_same_run_without_repeating_epochs(tmp_path):
    ctx = make_context(tmp_path)
    _stopped_after_first_epoch(ctx)
    resumed = []
    run_trial(ctx, CONFIG, lambda m, s: resumed.append(m))  # finds its checkpoint
    assert [m["epoch"] for m in resumed] == [2]
    (run,) = runs_of(ctx)
    steps = [
        h.step for h in ctx.tracker().client.get_metric_history(run.info.run_id, "val/clean_acc")
    ]
    assert sorted(steps) == [1, 2]
    # and the result equals an uninterrupted run's
    straight = []
    run_trial(make_context(tmp_path / "straight"), CONFIG, lambda m, s: straight.append(m))
    assert straight[-1] == resumed[-1]


def test_diverging_trial_fails_with_reason(tmp_path):
    ctx = make_context(tmp_path)
    bad = trial_config(hp={"temperature": 2.0, "alpha": 0.5, "lr": float("inf")})
    with pytest.raises(Diverged):
        run_trial(ctx, bad, lambda m, s: None)
    (run,) = runs_of(ctx)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "diverged"


def test_teacher_run_shows_accuracy_cmi_ncmi_and_a_corrupt_cache_file_is_logged(tmp_path):
    ctx = make_context(tmp_path)
    data = get_splits(ctx.spec, torch.device("cpu"))
    (t,) = ctx.spec.cell_teachers(Cell("ce", "kd", "pgd"))
    model, rec = get_teacher(ctx, t, data, torch.device("cpu"))
    assert rec.event == "trained"
    (run,) = runs_of(ctx, "teacher")
    m = run.data.metrics
    assert {
        "val/clean_acc",
        "val/robust_acc",
        "val/cmi",
        "val/separation",
        "test/clean_acc",
    } <= set(m)
    assert m["val/cmi"] > 0 and m["val/ncmi"] == pytest.approx(m["val/cmi"] / m["val/separation"])
    assert run.data.tags["cache_event"] == "trained" and run.data.params["loss"] == "ce"

    weights = Path(rec.location) / "teacher.pt"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated, e.g. a node died mid-copy
    again, rec2 = get_teacher(ctx, t, data, torch.device("cpu"))  # a later trial, same sweep
    assert rec2.event == "retrained" and "checksum" in rec2.problem
    (run,) = runs_of(ctx, "teacher")  # still one run per teacher per sweep, now with the event
    assert run.data.tags["cache_event"] == "retrained"
    assert "checksum" in run.data.tags["cache_problem"]
    # the same seed retrains the same teacher
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_teacher_set_members_are_cached_by_content_like_any_teacher(tmp_path):
    ctx = make_context(tmp_path)
    spec = ctx.spec
    data = get_splits(spec, torch.device("cpu"))
    primary = spec.teacher_variants()["mse"]
    sets = TeacherSetsSpec.model_validate({"robust": {"loss": "pgd_at", "params": {"steps": 2}}})
    defs = teacher_set("clean+robust", primary, sets, spec.teacher_defaults())
    models, records = get_teachers(ctx, defs, data, torch.device("cpu"))
    assert [r.event for r in records] == ["trained", "trained"] and len(models) == 2
    assert records[0].hash != records[1].hash
    _, again = get_teachers(ctx, defs, data, torch.device("cpu"))
    assert [r.event for r in again] == ["cached", "cached"]
    runs = runs_of(ctx, "teacher")
    assert sorted(r.data.tags["teacher_label"] for r in runs) == ["mse", "pgd_at+steps=2"]
    robust = next(r for r in runs if r.data.params["loss"] == "pgd_at")
    assert robust.data.params["loss_params.eps"] == str(spec.threat.eps)


def _steps(ctx, run_id, key="val/clean_acc"):
    return sorted(h.step for h in ctx.tracker().client.get_metric_history(run_id, key))


def test_a_kill_between_logging_and_checkpointing_does_not_log_an_epoch_twice(tmp_path):
    """The trial logs epoch 2 to MLflow, then dies before its checkpoint of epoch 2 is written
    (modelled by putting back the checkpoint of epoch 1): the restart trains epoch 2 again but
    logs it once."""
    ctx = make_context(tmp_path, budget={"trials_per_cell": 1, "epochs": 3, "grace_period": 3})
    key, checkpoints = CONFIG.key, ctx.checkpoints()
    saved = {}

    def report(metrics, state):
        saved[metrics["epoch"]] = checkpoints.store.read(key, "state.pt")
        if metrics["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_trial(ctx, CONFIG, report)
    checkpoints.store.write(saved[1], key, "state.pt")
    resumed = []
    run_trial(ctx, CONFIG, lambda m, s: resumed.append(m["epoch"]))
    assert resumed == [2, 3]
    (run,) = runs_of(ctx)
    assert run.info.status == "FINISHED"
    for metric in ("val/clean_acc", "val/robust_acc", "train/loss"):
        assert _steps(ctx, run.info.run_id, metric) == [1, 2, 3]
    assert len(ctx.tracker().client.get_metric_history(run.info.run_id, "test/clean_acc")) == 1


def test_a_trial_that_finished_before_a_restart_reports_without_training(tmp_path):
    ctx = make_context(tmp_path)
    first = []
    run_trial(ctx, CONFIG, lambda m, s: first.append(m))
    (run,) = runs_of(ctx)
    mtime = (tmp_path / "sweep" / "trials" / CONFIG.key / "state.pt").stat().st_mtime_ns
    again = []
    run_trial(ctx, trial_config(trial_id="new"), lambda m, s: again.append(m))
    assert [m["epoch"] for m in again] == [2]
    assert again[0]["val/clean_acc"] == first[-1]["val/clean_acc"]
    assert (tmp_path / "sweep" / "trials" / CONFIG.key / "state.pt").stat().st_mtime_ns == mtime
    assert _steps(ctx, run.info.run_id) == [1, 2]
    assert len(runs_of(ctx)) == 1


def test_a_diverged_trial_is_not_retried(tmp_path):
    ctx = make_context(tmp_path)
    bad = trial_config(hp={"temperature": 2.0, "alpha": 0.5, "lr": float("inf")})
    with pytest.raises(Diverged):
        run_trial(ctx, bad, lambda m, s: None)
    with pytest.raises(TrialFailed, match="diverged"):
        run_trial(ctx, bad, lambda m, s: None)
    (run,) = runs_of(ctx)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "diverged"


def test_a_trial_asha_stopped_reports_its_last_epoch_and_does_not_train_on(tmp_path):
    ctx = make_context(tmp_path)
    state = _stopped_after_first_epoch(ctx)
    ctx.checkpoints().set_outcome(CONFIG.key, STOPPED, "asha")
    again = []
    run_trial(ctx, CONFIG, lambda m, s: again.append(m))
    assert [m["epoch"] for m in again] == [1]
    assert again[0]["val/clean_acc"] == state["metrics"]["val/clean_acc"]
    (run,) = runs_of(ctx)
    assert _steps(ctx, run.info.run_id) == [1]


def test_a_methods_own_trainable_parts_are_optimised_checkpointed_and_restored(tmp_path):
    """GACD owns projection heads and a negative memory (Method.build -> trainable): the trial
    trains them with the student, saves them in its checkpoint, and a resumed trial continues
    from them: stopped after epoch 1 and resumed, it ends where an uninterrupted trial ends."""
    grid = {"teacher_loss": ["ce"], "method": ["gacd"], "train_attack": ["pgd"]}
    config = trial_config("ce.gacd.pgd", hp={"tau": 0.1, "distill_weight": 1.0})

    def final_state(ctx, stop_first: bool):
        states = []

        def report(metrics, state):  # state_dict tensors are the live ones: copy them
            states.append({k: v.clone() for k, v in state["method_parts"].items()})
            if stop_first and len(states) == 1:
                raise _Stop

        if stop_first:
            with pytest.raises(_Stop):
                run_trial(ctx, config, report)
        run_trial(ctx, config, report)
        return states

    whole = final_state(make_context(tmp_path / "a", grid=grid, search_space={}), False)
    cut = final_state(make_context(tmp_path / "b", grid=grid, search_space={}), True)
    first, last = whole[0], whole[-1]
    heads = [k for k in first if k.startswith("embed")]
    assert heads and any(not torch.equal(first[k], last[k]) for k in heads)  # trained
    assert any("memory" in k or "bank" in k for k in first)  # the memory is checkpointed too
    resumed = cut[-1]
    assert resumed.keys() == last.keys()
    for k in last:
        assert torch.allclose(resumed[k].float(), last[k].float(), atol=1e-5), k
