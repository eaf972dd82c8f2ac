"""One trial: teacher(s) from the cache -> train the student -> report each epoch -> test once.

Plain Python: Ray reaches this module only through the `report` callback that tune.py passes in,
so a trial can also be run in a loop (bench/) or a test without Ray.
"""

from __future__ import annotations

import functools
import io
import os
import random
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attacks import run_attack
from .checkpoints import FAILED, STOPPED, TrialCheckpoints, config_key, trial_key, trial_label
from .cmi import output_metrics
from .data import Splits, load_splits, make_augmentation
from .evaluate import accuracy, evaluate_suite, sanity_warnings
from .fast import FastPath, maybe_compile, prepare, resolve, to_format, training_forwards
from .methods import METHODS
from .models import build_model
from .spec import TRAINING_PARAMS, Cell, SweepSpec, dump_spec
from .teacher_defs import TeacherDef
from .teacher_losses import TEACHER_LOSSES
from .teachers import TeacherCache, TeacherRecord
from .tracking import Tracker
from .training import Diverged, make_optimization, seed_everything, train_epoch

Report = Callable[[dict[str, float], dict[str, Any]], None]  # (metrics, checkpoint state)


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares, resolved once by the driver (absolute paths)."""

    spec: SweepSpec
    sweep_dir: str
    teacher_dir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str | None

    def tracker(self) -> Tracker:
        return _tracker(self.tracking_uri, self.experiment)

    def checkpoints(self) -> TrialCheckpoints:
        return TrialCheckpoints(f"{self.sweep_dir}/trials")


@functools.lru_cache(maxsize=4)
def _tracker(uri: str, experiment: str) -> Tracker:
    return Tracker(uri, experiment)


@functools.lru_cache(maxsize=2)
def _cached_splits(device: str, **kw: Any) -> Splits:
    """Reused Ray actors load a dataset once, not once per trial, and keep it on the trial's
    device: on a GPU the whole dataset stays there as tensors (batches, augmentation and
    attacks never touch the host), and is not copied again for each trial."""
    return load_splits(**kw).to(device)


def get_splits(spec: SweepSpec, device: torch.device) -> Splits:
    d = spec.dataset
    return _cached_splits(
        str(device),
        name=d.name,
        data_dir=d.data_dir,
        download=d.download,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
    )


def pick_device(spec: SweepSpec) -> torch.device:
    if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def new_model(
    arch: str, data: Splits, device: torch.device, fast: FastPath | None = None
) -> nn.Module:
    """A freshly initialised network on `device`, in the memory format `fast` asks for."""
    info = data.info
    model = build_model(
        arch, in_channels=info.shape[0], num_classes=info.num_classes, mean=info.mean, std=info.std
    ).to(device)
    return prepare(model, fast) if fast is not None else model


def fast_path(spec: SweepSpec, device: torch.device) -> FastPath:
    """The trial's `compute:` settings resolved on its device (auto: bf16 + channels_last on
    CUDA, plain fp32 on a CPU)."""
    return resolve(spec.compute, device)


def _optim_dict(optim: Any, hp: dict[str, Any] | None = None) -> dict[str, Any]:
    out = optim.model_dump()
    for k in TRAINING_PARAMS:
        if hp and k in hp:
            out[k] = hp[k]
    return out


def augmentation(spec: SweepSpec, data: Splits) -> Any:
    d = spec.dataset
    return make_augmentation(data.info, basic=d.augment, strong=d.strong_augment)


def _val_subset(spec: SweepSpec, data: Splits) -> tuple[torch.Tensor, torch.Tensor]:
    n = spec.evaluation.val_examples or len(data.x_val)
    return data.x_val[:n], data.y_val[:n]


def validation_metrics(spec: SweepSpec, model: nn.Module, data: Splits) -> dict[str, float]:
    """The cheap per-epoch check that Optuna and ASHA see: validation split only."""
    x, y = _val_subset(spec, data)
    ev = spec.evaluation
    with torch.no_grad():
        model.eval()
        logits = torch.cat(
            [model(x[i : i + ev.batch_size]) for i in range(0, len(x), ev.batch_size)]
        )
        val_loss = torch.nn.functional.cross_entropy(logits, y).item()
    clean = logits.argmax(1) == y
    return {
        "val/clean_acc": int(clean.sum()) / max(len(y), 1),  # as `accuracy` counts
        "val/robust_acc": accuracy(
            model,
            x,
            y,
            attack=ev.val_attack,
            eps=spec.threat.eps,
            norm=spec.threat.norm,
            batch_size=ev.batch_size,
            clean=clean,
        ),
        "val/loss": val_loss,
    }


def test_metrics(
    spec: SweepSpec,
    model: nn.Module,
    data: Splits,
    *,
    state_dir: Path | None = None,
    flags: list[str] | None = None,
) -> dict[str, float]:
    """The full suite on the test split: computed once per finished trial, never tuned on.
    AutoAttack progress is kept in `state_dir` (resumed if interrupted)."""
    n = spec.evaluation.test_examples or len(data.x_test)
    return evaluate_suite(
        model,
        data.x_test[:n],
        data.y_test[:n],
        spec.evaluation.attacks,
        eps=spec.threat.eps,
        norm=spec.threat.norm,
        batch_size=spec.evaluation.batch_size,
        state_dir=state_dir,
        flags=flags,
    )


# --- teachers --------------------------------------------------------------------------------
def teacher_identity(spec: SweepSpec, t: TeacherDef) -> dict[str, Any]:
    """Everything that defines a teacher, and nothing that does not (paths, sweep name, label)."""
    d = spec.dataset
    return {
        "dataset": {
            "name": d.name,
            "val_fraction": d.val_fraction,
            "test_fraction": d.test_fraction,
            "split_seed": d.split_seed,
            "augment": d.augment,
        }
        | ({"strong_augment": d.strong_augment} if d.strong_augment != "none" else {}),
        "arch": t.arch,
        "loss": t.loss,
        "loss_params": t.params_dict(),
        "epochs": t.epochs,
        "optim": spec.teacher.optim.model_dump(),
        "seed": t.seed,
    }


def teacher_metrics(spec: SweepSpec, model: nn.Module, data: Splits) -> dict[str, float]:
    """How the seed papers compare teachers: accuracy, robustness, and CMI / NCMI of the output
    distributions on the validation split."""
    x, y = _val_subset(spec, data)
    info = output_metrics(model, x, y, batch_size=spec.evaluation.batch_size)
    return {
        **validation_metrics(spec, model, data),
        **{f"val/{k}": v for k, v in info.items()},
        **test_metrics(spec, model, data),
    }


def train_teacher(
    spec: SweepSpec, t: TeacherDef, model: nn.Module, data: Splits
) -> dict[str, float]:
    """Train a freshly initialised `model` (get_teachers seeds its initialisation)."""
    objective = TEACHER_LOSSES.get(t.loss)(t.params_dict(), data.info.num_classes)
    optim = _optim_dict(spec.teacher.optim)
    opt, sched = make_optimization(model, optim, t.epochs, len(data.x_train))
    objective.begin(model, data.x_train, data.y_train, optim["batch_size"])
    # the teacher's training steps take the fast path too (not compiled: trained once per sweep)
    fast = fast_path(spec, data.x_train.device)
    for epoch in range(t.epochs):
        with training_forwards(fast, model):
            loss_value = train_epoch(
                model,
                data,
                batch_size=optim["batch_size"],
                augmentation=augmentation(spec, data),
                step_loss=lambda x, y: objective.loss(model, to_format(x, fast), y),
                optimizer=opt,
                schedule=sched,
            )
        objective.end_epoch()
        # printed, not logged: Ray forwards worker stdout to the driver's console
        print(f"teacher {t.label}: epoch {epoch + 1}/{t.epochs} loss {loss_value:.4f}", flush=True)
    model.eval()
    return teacher_metrics(spec, model, data)


def get_teacher(
    ctx: SweepContext, t: TeacherDef, data: Splits, device: torch.device
) -> tuple[nn.Module, TeacherRecord]:
    """The teacher `t`, from the cache or trained now; frozen, in eval mode."""
    spec = ctx.spec
    seed_everything(t.seed)  # a teacher depends on its own seed, not the trial's
    model = new_model(t.arch, data, device, fast_path(spec, device))
    identity = teacher_identity(spec, t)

    def on_ready(record: TeacherRecord) -> None:
        ctx.tracker().ensure_teacher_run(
            record,
            label=t.label,
            params={"label": t.label, **identity},
            parent_run_id=ctx.parent_run_id,
            sweep=spec.name,
        )

    record = TeacherCache(ctx.teacher_dir).get_or_train(
        identity, model, lambda m: train_teacher(spec, t, m, data), on_ready
    )
    return frozen(model), record


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad: how teachers are used and runs are analysed."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def get_teachers(
    ctx: SweepContext, defs: list[TeacherDef], data: Splits, device: torch.device
) -> tuple[list[nn.Module], list[TeacherRecord]]:
    pairs = [get_teacher(ctx, t, data, device) for t in defs]
    return [m for m, _ in pairs], [r for _, r in pairs]


# --- students --------------------------------------------------------------------------------
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


def trial_params(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """What MLflow records as the run's params: the cell's axes, every resolved hyperparameter,
    and the settings a reader needs to compare runs."""
    return {
        "teacher_loss": config["teacher_loss"],
        "method": config["method"],
        "train_attack": config["train_attack"],
        **config["hp"],
        "seed": config["seed"],
        "epochs": spec.budget.epochs,
        "dataset": spec.dataset.name,
        "student_arch": spec.student.arch,
        "teacher_arch": spec.teacher.arch,
        "eps": spec.threat.eps,
        "train_attack_steps": spec.train_attack.steps,
    }


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
    state_dir = Path(ctx.sweep_dir) / "autoattack" / run_id
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
    config: dict[str, Any],
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
        tracker.resume_run(resume_run, {"trial_id": config.get("trial_id", ""), **where})
        return resume_run
    repeat = {"repeat": str(config["repeat"])} if config.get("repeat") else {}
    run_id = tracker.start_run(
        trial_label(config),
        params=trial_params(spec, config),
        tags={
            "kind": "student",
            "sweep": spec.name,
            "cell": config["cell"],
            "config_key": config_key(config),
            **repeat,
            "teacher_loss": config["teacher_loss"],
            "method": config["method"],
            "train_attack": config["train_attack"],
            "trial_id": config.get("trial_id", ""),
            "optuna_trial": str(config.get("optuna_number", "")),
            "teacher_hash": t_hash,
            **where,
        },
        parent_run_id=ctx.parent_run_id,
    )
    ctx.checkpoints().set_run_id(key, run_id)
    return run_id


class TrialFailed(RuntimeError):
    """A trial that failed for good before (e.g. diverged): restarting it cannot help."""


def run_trial(
    ctx: SweepContext,
    config: dict[str, Any],
    report: Report,
    threads: int | None = None,
    where: dict[str, str] | None = None,
) -> None:
    """Train one student, or continue it from its checkpoint. `config` holds the cell
    (teacher_loss, method, train_attack), `hp` (tuned values), `seed`, `trial_id` and
    `cell_index`. Every epoch: log to MLflow, checkpoint, then report (see checkpoints.py).
    `where`: extra run tags saying where it runs (the Ray node, from tune.py)."""
    spec = ctx.spec
    key = trial_key(config)
    checkpoints = ctx.checkpoints()
    outcome = checkpoints.outcome(key)
    if outcome and outcome["status"] == FAILED:
        raise TrialFailed(f"{key} failed before ({outcome['reason']}); not retried")
    resume = checkpoints.state(key)
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
    seed_everything(config["seed"])
    device = pick_device(spec)
    data = get_splits(spec, device)
    method = METHODS.get(config["method"])(config["hp"])

    cell = Cell(config["teacher_loss"], config["method"], config["train_attack"])
    teachers, records = get_teachers(ctx, spec.cell_teachers(cell), data, device)
    t_hash = ",".join(r.hash for r in records)
    seed_everything(config["seed"])

    fast = fast_path(spec, device)
    student = new_model(spec.student.arch, data, device, fast)
    optim = _optim_dict(spec.student.optim, config["hp"])
    opt, sched = make_optimization(student, optim, spec.budget.epochs, len(data.x_train))
    start = 0
    if resume:
        student.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["schedule"])
        _set_rng_state(resume["rng"])
        method.load_state_dict(resume.get("method", {}))
        start = resume["epoch"]
    where = {"host": socket.gethostname(), "worker_pid": str(os.getpid()), **(where or {})}
    if start:
        where["resumed_from_epoch"] = str(start)
    maybe_compile(student, fast)  # after load_state_dict: the compiled module is the same one
    run_id = _student_run(ctx, config, key, t_hash, run_before, where)
    logged = tracker.logged_steps(run_id) if run_before else {}
    if start:
        print(f"{key}: continuing from epoch {start} in MLflow run {run_id}", flush=True)

    eps = spec.train_attack.eps if spec.train_attack.eps is not None else spec.threat.eps

    def attack(model: nn.Module, x: torch.Tensor, objective: Any) -> torch.Tensor:
        return run_attack(
            config["train_attack"],
            model,
            x,
            objective,
            eps=eps,
            steps=spec.train_attack.steps,
            step_size=spec.train_attack.step_size,
            norm=spec.threat.norm,
        )

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = to_format(x, fast)
        x_adv = method.adversarial(student, teachers, x, y, attack)
        return method.loss(student, teachers, x, x_adv, y)

    try:
        for epoch in range(start + 1, spec.budget.epochs + 1):
            method.start_epoch(epoch, spec.budget.epochs)
            with training_forwards(fast, student, *teachers):
                train_loss = train_epoch(
                    student,
                    data,
                    batch_size=optim["batch_size"],
                    augmentation=augmentation(spec, data),
                    step_loss=step_loss,
                    optimizer=opt,
                    schedule=sched,
                )
            metrics = {"train/loss": train_loss, **validation_metrics(spec, student, data)}
            tracker.log_metrics(run_id, metrics, step=epoch, logged=logged)
            if epoch == spec.budget.epochs:  # before the last report: Tune may stop us there
                finalize(ctx, student, data, run_id, epoch)
            state = student_state(student, opt, sched, epoch, run_id)
            state |= {"method": method.state_dict(), "metrics": metrics}
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
    metrics = tracker.client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "train/"))} | {
        "epoch": epochs
    }


def finalize_from_state(
    ctx: SweepContext, config: dict[str, Any], state: dict[str, Any]
) -> dict[str, float]:
    """For a trial stopped early by ASHA: evaluate its last checkpoint and finish its run."""
    seed_everything(config["seed"])
    device = pick_device(ctx.spec)
    data = get_splits(ctx.spec, device)
    model = new_model(ctx.spec.student.arch, data, device, fast_path(ctx.spec, device))
    model.load_state_dict(state["model"])
    return finalize(ctx, model, data, state["mlflow_run_id"], state["epoch"])
