"""One trial: teacher(s) from the cache -> train the student -> report each epoch -> test once.

Plain Python: Ray reaches this module only through the `report` callback that the driver passes
in, so a trial can also be run in a loop (bench/) or a test without Ray.
"""

from __future__ import annotations

import io
import os
import random
import socket
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoints import FAILED, STOPPED
from .config import TrialConfig
from .context import (
    SweepContext,
    augmentation,
    fast_path,
    get_splits,
    new_model,
    optim_settings,
    pick_device,
)
from .data import Splits
from .evaluate import sanity_warnings
from .fast import maybe_compile
from .files import DamagedFile
from .measure import test_metrics, validation_metrics
from .methods import METHODS
from .protocol import protocol
from .spec import SweepSpec, dump_spec
from .teacher_losses import TEACHER_LOSSES
from .teachers import get_teachers
from .tracking import Tracker
from .training import Diverged, make_optimization, seed_everything, student_epoch

BUILD_SAMPLE = 64  # examples a method's build() sees
Report = Callable[[dict[str, float], dict[str, Any]], None]  # (metrics, checkpoint state)


def _rng_state() -> dict[str, Any]:
    """Plain tensors and tuples only, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])


def trial_params(spec: SweepSpec, config: TrialConfig) -> dict[str, Any]:
    """What MLflow records as the run's params: the cell's axes, every resolved hyperparameter,
    and the settings a reader needs to compare runs."""
    return {
        "teacher_loss": config.teacher_loss,
        "method": config.method,
        "train_attack": config.train_attack,
        **config.hp,
        "seed": config.seed,
        "epochs": spec.budget.epochs,
        "dataset": spec.dataset.name,
        "student_arch": spec.student.arch,
        "teacher_arch": spec.teacher.arch,
        "eps": spec.threat.eps,
        **{f"protocol/{k}": v for k, v in protocol(spec).items()},
        **spec.train_attack.resolve(
            config.train_attack, spec.threat.eps, spec.threat.norm
        ).log_params(),
    }


def fidelity_tags(spec: SweepSpec, config: TrialConfig) -> dict[str, str]:
    """How the run's method and teacher loss were checked against their papers (fidelity.py),
    and whether its hyperparameters are the method's paper setting: a run read on its own, in
    the MLflow UI, says whether its numbers are a paper's method."""
    method = METHODS.get(config.method)
    tags = {"method_fidelity": method.fidelity.tag()}
    teacher = spec.teacher_variants().get(config.teacher_loss)
    if teacher is not None:
        loss = TEACHER_LOSSES.get(teacher.loss)
        tags["teacher_fidelity"] = loss.fidelity.tag()
    paper, _ = spec.paper_start(config.method)
    if paper:
        same = all(config.hp.get(k) == v for k, v in paper.items())
        tags["paper_default"] = "true" if same else "false"
    return tags


def student_state(
    model: nn.Module, opt: Any, sched: Any, epoch: int, run_id: str
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),
        "epoch": epoch,
        "mlflow_run_id": run_id,
        "rng": _rng_state(),
    }


def finalize(
    ctx: SweepContext,
    model: nn.Module,
    data: Splits,
    run_id: str,
    epoch: int,
) -> dict[str, float]:
    """Test-set suite, artifacts, FINISHED. Idempotent: a finished run is left alone."""
    tracker = ctx.tracker()
    if tracker.status(run_id) == "FINISHED":
        return {}
    flags: list[str] = []
    state_dir = ctx.layout.autoattack_state(run_id)
    metrics = test_metrics(ctx.spec, model, data, state_dir=state_dir, flags=flags)
    # a finalize cut short (killed) and run again must not log the test metrics twice
    tracker.log_metrics(run_id, metrics, step=epoch, logged=tracker.logged_steps(run_id))
    warnings = flags + sanity_warnings(
        metrics, ctx.spec.evaluation.attacks, eps=ctx.spec.threat.eps
    )
    for w in warnings:
        print(f"warning: run {run_id}: {w}", flush=True)
    tracker.set_tags(run_id, {"sanity_warnings": "; ".join(warnings)[:5000] or "none"})
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    tracker.log_artifacts(run_id, {"student.pt": buf.getvalue(), "sweep.yaml": dump_spec(ctx.spec)})
    tracker.set_tags(run_id, {"epochs_trained": str(epoch)})
    tracker.finish(run_id)
    return metrics


def _student_run(
    ctx: SweepContext,
    config: TrialConfig,
    key: str,
    t_hash: str,
    resume_run: str | None,
    where: dict[str, str],
) -> str:
    """The trial's MLflow run: the one it started before (continued, RUNNING again) or a new
    one, whose id is checkpointed at once so a restart never opens a second run. `where`:
    tags naming the process running it now (host, pid, Ray node)."""
    tracker, spec = ctx.tracker(), ctx.spec
    if resume_run:
        tracker.resume_run(resume_run, {"trial_id": config.trial_id, **where})
        return resume_run
    repeat = {"repeat": str(config.repeat)} if config.repeat else {}
    if config.refit:  # its own kind: never a candidate of the tuning's selection rule
        repeat = {"refit_of": tuned_run_id(ctx, config) or "", "data": "train+val"}
    run_id = tracker.start_run(
        config.label,
        params=trial_params(spec, config),
        tags={
            "kind": "refit" if config.refit else "student",
            "sweep": spec.name,
            "cell": config.cell,
            "config_key": config.config_key,
            **repeat,
            "teacher_loss": config.teacher_loss,
            "method": config.method,
            "train_attack": config.train_attack,
            "trial_id": config.trial_id,
            "optuna_trial": str(config.number),
            "teacher_hash": t_hash,
            **fidelity_tags(spec, config),
            **where,
        },
        parent_run_id=ctx.parent_run_id,
    )
    ctx.checkpoints().set_run_id(key, run_id)
    return run_id


def record_failure(ctx: SweepContext, config: TrialConfig, reason: str, detail: str) -> None:
    """Fail a trial for good from outside it (the driver, on a timeout): its outcome (a
    restart re-raises it, TrialFailed) and its MLflow run, FAILED with `reason`. A trial
    stopped before it opened its run gets one, so MLflow lists every trial that failed."""
    checkpoints = ctx.checkpoints()
    checkpoints.set_outcome(config.key, FAILED, reason)
    run_id = checkpoints.run_id(config.key) or _student_run(ctx, config, config.key, "", None, {})
    ctx.tracker().fail(run_id, reason, detail)


def method_parts(method: Any) -> nn.Module | None:
    """The method's trainable parts, in train mode (None for most methods)."""
    parts = getattr(method, "trainable", None)
    if parts is not None:
        parts.train()
    return parts


def tuned_run_id(ctx: SweepContext, config: TrialConfig) -> str | None:
    """The MLflow run of the tuned trial a refit retrains (its configuration's repeat-0 run)."""
    return ctx.checkpoints().run_id(replace(config, refit=False, repeat=0).key)


class TrialFailed(RuntimeError):
    """A trial that failed for good before (e.g. diverged): restarting it cannot help."""


def run_trial(
    ctx: SweepContext,
    config: TrialConfig,
    report: Report,
    threads: int | None = None,
    where: dict[str, str] | None = None,
) -> None:
    """Train one student, or continue it from its checkpoint. `config` says what the trial is
    (its cell, hyperparameters, seed, number, repeat). Every epoch: log to MLflow, checkpoint,
    then report (see checkpoints.py). `where`: extra run tags saying where it runs (the Ray
    node, from the driver)."""
    spec = ctx.spec
    key = config.key
    checkpoints = ctx.checkpoints()
    outcome = checkpoints.outcome(key)
    if outcome and outcome["status"] == FAILED:
        raise TrialFailed(f"{key} failed before ({outcome['reason']}); not retried")
    restarted: dict[str, str] = {}
    try:
        resume = checkpoints.state(key)
    except DamagedFile as e:  # its MLflow run (run.json) continues, from the first epoch
        print(f"warning: {e}; {key} trains again from its first epoch", flush=True)
        resume, restarted = None, {"restarted_from_scratch": str(e)[:5000]}
    tracker = ctx.tracker()
    run_before = resume["mlflow_run_id"] if resume else checkpoints.run_id(key)
    if run_before and tracker.status(run_before) == "FINISHED":  # done before the kill
        report(_final_result(tracker, run_before, spec.budget.epochs), resume or {})
        return
    if resume and outcome and outcome["status"] == STOPPED:  # ASHA's verdict stands
        report({**resume["metrics"], "epoch": resume["epoch"]}, {})
        return

    if threads:
        torch.set_num_threads(threads)
    seed_everything(config.seed)
    device = pick_device(spec)
    data = get_splits(spec, device)
    method = METHODS.get(config.method)(config.hp)

    teachers, records = get_teachers(ctx, spec.cell_teachers(config.grid_cell), data, device)
    t_hash = ",".join(r.hash for r in records)
    seed_everything(config.seed)
    if config.refit:  # teachers stay as tuned (trained on train only); the student sees val too
        data = data.refit()

    fast = fast_path(spec, device)
    student = new_model(spec.student.arch, data, device, fast)
    # a sample batch to read feature sizes off (Method.build)
    method.build(student, teachers, data.x_train[:BUILD_SAMPLE], len(data.x_train))
    parts = method_parts(method)
    optim = optim_settings(spec.student.optim, config.hp)
    # the method's own trainable parts (GACD's heads) are optimised with the student, same settings
    trained = nn.ModuleList([student, parts]) if parts is not None else student
    opt, sched = make_optimization(trained, optim, spec.budget.epochs, len(data.x_train))
    start = 0
    if resume:
        student.load_state_dict(resume["model"])
        if parts is not None:
            parts.load_state_dict(resume["method_parts"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["schedule"])
        _set_rng_state(resume["rng"])
        method.load_state_dict(resume.get("method", {}))
        start = resume["epoch"]
    where = {
        "host": socket.gethostname(),
        "worker_pid": str(os.getpid()),
        **restarted,
        **(where or {}),
    }
    if start:
        where["resumed_from_epoch"] = str(start)
    maybe_compile(student, fast)  # after load_state_dict: the compiled module is the same one
    run_id = _student_run(ctx, config, key, t_hash, run_before, where)
    logged = tracker.logged_steps(run_id) if run_before else {}
    if start:
        print(f"{key}: continuing from epoch {start} in MLflow run {run_id}", flush=True)

    attack = spec.train_attack.resolve(config.train_attack, spec.threat.eps, spec.threat.norm)

    try:
        for epoch in range(start + 1, spec.budget.epochs + 1):
            method.start_epoch(epoch, spec.budget.epochs)
            train_loss = student_epoch(
                method,
                student,
                teachers,
                data,
                attack=attack,
                fast=fast,
                batch_size=optim["batch_size"],
                augmentation=augmentation(spec, data),
                optimizer=opt,
                schedule=sched,
            )
            metrics = {"train/loss": train_loss}
            if not config.refit:  # a refit has no validation split left to measure on
                metrics |= validation_metrics(spec, student, data)
            tracker.log_metrics(run_id, metrics, step=epoch, logged=logged)
            if epoch == spec.budget.epochs:  # before the last report: Tune may stop us there
                finalize(ctx, student, data, run_id, epoch)
            state = student_state(student, opt, sched, epoch, run_id)
            state |= {"method": method.state_dict(), "metrics": metrics}
            if parts is not None:
                state["method_parts"] = parts.state_dict()
            checkpoints.save_state(key, state)
            report({**metrics, "epoch": epoch}, state)
    except Diverged as e:
        checkpoints.set_outcome(key, FAILED, "diverged")
        tracker.fail(run_id, "diverged", str(e))
        raise
    except Exception as e:
        tracker.fail(run_id, type(e).__name__, traceback.format_exc())
        raise


def _final_result(tracker: Tracker, run_id: str, epochs: int) -> dict[str, float]:
    """A finished run's last validation metrics, as the trial reported them."""
    metrics = tracker.metrics(run_id)
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "train/"))} | {
        "epoch": epochs
    }


def finalize_from_state(
    ctx: SweepContext, config: TrialConfig, state: dict[str, Any]
) -> dict[str, float]:
    """For a trial stopped early by ASHA: evaluate its last checkpoint and finish its run."""
    seed_everything(config.seed)
    device = pick_device(ctx.spec)
    data = get_splits(ctx.spec, device)
    model = new_model(ctx.spec.student.arch, data, device, fast_path(ctx.spec, device))
    model.load_state_dict(state["model"])
    return finalize(ctx, model, data, state["mlflow_run_id"], state["epoch"])
