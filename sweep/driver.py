"""The driver: run or resume a whole sweep on Ray Tune, finish what Tune leaves, report progress.

One Tune experiment runs every cell; the search inside each cell is search.py's, each trial is
trial.py's. Ray lives here and in search.py only. The driver decides what runs where (embedded
Ray on loopback, or a cluster), trains teachers first where trials cannot share a lock, tests the
trials ASHA stopped, and leaves nothing RUNNING when interrupted.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from . import preflight, selection
from .checkpoints import FAILED, STOPPED
from .config import TrialConfig
from .console import DONE, SweepConsole, duration, is_terminal
from .console import FAILED as TRIAL_FAILED
from .console import STOPPED as TRIAL_STOPPED
from .context import SweepContext, get_splits, pick_device
from .credentials import redact, redact_spec
from .layout import SweepLayout, open_sweep, write_state
from .progress import sweep_progress
from .search import CellASHA, CellSearcher
from .spec import SweepSpec, dump_spec
from .status import cell_status, close_stale, driver_ended, driver_started, status_table
from .store import is_remote
from .teacher_defs import teacher_generations
from .teachers import get_teacher
from .tracking import Tracker, default_artifact_root, resolve_tracking_uri, ui_hint
from .trial import finalize_from_state, record_failure, run_trial
from .watch import Watch


class SweepExists(Exception):
    pass


def trainable(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune function trainable. Progress lives in the sweep's own checkpoints
    (checkpoints.py), keyed by the trial's cell and index, so Tune gets metrics only."""
    for name in ("ray.train", "ray.tune"):  # per-report INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    threads = max(1, int(ctx.spec.resources.cpus_per_trial))
    where = {"ray_node_id": ray.get_runtime_context().get_node_id()}
    run_trial(
        ctx,
        TrialConfig.from_dict(config),
        lambda metrics, _state: tune.report(metrics),
        threads=threads,
        where=where,
    )


def _pickled_ctx(ctx: SweepContext) -> SweepContext:
    """What a callback pickled with Tune's run config (tune/tuner.pkl) may hold of the sweep's
    context: its storage URLs without their passwords (a resumed sweep brings its own)."""
    return replace(
        ctx,
        spec=redact_spec(ctx.spec),
        layout=replace(ctx.layout, optuna_url=redact(ctx.layout.optuna_url)),
        tracking_uri=redact(ctx.tracking_uri),
    )


class Progress(tune.Callback):
    """Tune's events, for the progress display (console.py) and for the bookkeeping they call
    for: a trial ASHA stopped is marked so a restart does not train it on; a trial that failed
    for good (retries spent, worker lost) has its MLflow run ended FAILED with the reason."""

    def __init__(self, ctx: SweepContext, console: SweepConsole) -> None:
        self.ctx, self.spec, self.console = ctx, ctx.spec, console
        self._cell: dict[str, str] = {}  # Tune trial id -> its cell

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the run config, callbacks included, with the experiment (tune/tuner.pkl);
        # the display holds this terminal, and a resumed sweep brings its own (resume_sweep),
        # so the pickled one holds no storage URL with its password
        ctx = _pickled_ctx(self.ctx)
        return {**self.__dict__, "console": None, "ctx": ctx, "spec": ctx.spec}

    def _config(self, trial: Any) -> TrialConfig | None:
        return TrialConfig.from_dict(trial.config) if trial.config else None

    def _running(self, trials: list) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in trials:
            if t.status != "RUNNING":
                continue
            if t.trial_id not in self._cell:
                c = self._config(t)
                self._cell[t.trial_id] = c.cell if c else ""
            cell = self._cell[t.trial_id]
            out[cell] = out.get(cell, 0) + 1
        return out

    def _ended(self, trial: Any, outcome: str, reason: str = "") -> None:
        c, r = self._config(trial), trial.last_result or {}
        got = [r.get(o.metric) for o in self.spec.objectives]
        if all(isinstance(v, float) for v in got):
            val: float | tuple[float, ...] | None = got[0] if len(got) == 1 else tuple(got)
        else:
            val = None
        self.console.trial_ended(
            trial.trial_id,
            c.cell if c else "",
            c.label if c else trial.trial_id,
            outcome,
            value=val,
            epoch=int(r.get("epoch", 0)),
            config=c.config_key if c else None,
            number=c.number if c else None,
            repeat=c.repeat if c else 0,
            reason=reason,
        )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        running = self._running(trials)
        if trial.status != "RUNNING":  # Tune calls this just before it says so
            c = self._config(trial)
            cell = c.cell if c else ""
            running[cell] = running.get(cell, 0) + 1
        self.console.running_now(running)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.console.tick(lambda: self._running(trials))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.console.trial_progress(trial.trial_id, int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        if epoch < self.spec.budget.epochs:
            key = TrialConfig.from_dict(trial.config).key
            self.ctx.checkpoints().set_outcome(key, STOPPED, "asha")
        self._ended(trial, DONE if epoch >= self.spec.budget.epochs else TRIAL_STOPPED)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        c = TrialConfig.from_dict(trial.config)
        outcome = self.ctx.checkpoints().outcome(c.key)
        if outcome and outcome["status"] == FAILED:  # the restart only re-raises the reason
            return
        reason = _error_line(_error_text(trial))
        self.console.note(
            f"{c.label} failed, retrying from its checkpoint "
            f"({trial.num_failures}/{self.spec.resources.max_failures})"
            + (f": {reason}" if reason else "")
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        detail = _error_text(trial)
        run_id = self.ctx.checkpoints().run_id(TrialConfig.from_dict(trial.config).key)
        if run_id:  # the trial ends its run itself when it can; a killed worker cannot
            tracker = self.ctx.tracker()
            if tracker.status(run_id) == "RUNNING":
                tracker.fail(run_id, "worker_lost", detail[-5000:])
        # the traceback is in Tune's error file and on the MLflow run (failure_detail), not on
        # the console (TUNE_PRINT_ALL_TRIAL_ERRORS=0): say where
        where = _error_file(self.ctx, trial)
        reason = _error_line(detail) or "no error recorded"
        outcome = self.ctx.checkpoints().outcome(TrialConfig.from_dict(trial.config).key)
        if outcome and outcome["status"] == FAILED and outcome["reason"] not in reason:
            reason = f"{outcome['reason']}: {reason}"  # e.g. timeout: the actor was killed
        self._ended(trial, TRIAL_FAILED, reason + (f" (traceback: {where})" if where else ""))


class TrialWatch(tune.Callback):
    """Trials past `budget.trial_timeout` are stopped (their worker killed: a hung trial
    answers nothing) and failed for good with reason `timeout` (trial.record_failure: the
    restart Tune makes re-raises it, Optuna records FAIL with the reason); trials quiet for
    much longer than an epoch takes are named on the console (watch.py)."""

    def __init__(self, ctx: SweepContext, console: SweepConsole) -> None:
        self.ctx, self.console = ctx, console
        self.watch = Watch(ctx.spec.budget.trial_timeout)
        self._trials: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled with the run config, as Progress
        return {**self.__dict__, "console": None, "_trials": {}, "ctx": _pickled_ctx(self.ctx)}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.watch.started(trial.trial_id)
        self._trials[trial.trial_id] = trial

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.watch.reported(trial.trial_id)

    def _gone(self, trial: Any) -> None:
        self.watch.ended(trial.trial_id)
        self._trials.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._gone(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._gone(trial)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        for tid, took in self.watch.overdue():
            trial = self._trials[tid]
            self._gone(trial)
            if trial.status != "RUNNING":
                continue
            actor = trial.temporary_state.ray_actor
            if actor is not None:  # first, so the trial cannot write after its failure
                ray.kill(actor, no_restart=True)
            config = TrialConfig.from_dict(trial.config)
            limit = duration(self.ctx.spec.budget.trial_timeout or 0)
            record_failure(self.ctx, config, "timeout", f"still running after {duration(took)}")
            self.console.note(
                f"{config.label} ran past budget.trial_timeout ({limit}): stopped, failed"
            )
        for tid, quiet, typical in self.watch.stalled():
            config = TrialConfig.from_dict(self._trials[tid].config)
            self.console.note(
                f"{config.label} has not reported for {duration(quiet)} (an epoch takes "
                f"{duration(typical)} here): stalled?"
            )


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours the task's name in a RayTaskError


def _error_text(trial: Any) -> str:
    """What Tune recorded of a trial's last failure, without colour codes, or ''. Read from
    the error file Tune has just written on this machine (its copy in the sweep's storage is
    synced later)."""
    try:
        path = trial.error_file
        if path and os.path.exists(path):
            text = Path(path).read_text(errors="replace").rsplit("Failure # ", 1)[-1]
        else:
            error = trial.get_error()
            text = str(error) if error is not None else ""
    except Exception:  # a display detail: never let it break the bookkeeping
        return ""
    return ANSI.sub("", text)


def _error_file(ctx: SweepContext, trial: Any) -> str:
    """Where the trial's error file is kept, short: Tune's trial folder names hold the whole
    configuration, so a pattern that names one folder."""
    if not trial.path:
        return ""
    name, short = Path(trial.path).name, str(trial)
    folder = f"{short}_*" if name.startswith(f"{short}_") else name
    return f"{ctx.layout.tune}/{folder}/error.txt"


def _error_line(text: str) -> str:
    """The line that names an error: the last non-blank one (`ValueError: ...`), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# --- the driver ---------------------------------------------------------------------------------
def init_ray(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start an embedded Ray on loopback.
    True when Ray is embedded (this machine is all there is)."""
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_console(embedded=not address)
    if ray.is_initialized():
        return not address
    if address:
        ray.init(address=address, log_to_driver=True)
        sigterm_as_ctrl_c()
        return False
    # loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set by cli.main before Ray's import
    # (setting it here, after `import ray`, would be too late: DESIGN §3.8)
    ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    sigterm_as_ctrl_c()
    return True


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (`ray job stop`, Kubernetes, `kill`) stops the sweep as Ctrl-C does: Tune saves
    its state, running trials' runs are marked KILLED, the sweep stays resumable. ray.init
    installs its own SIGTERM handler, which exits at once (leaving runs RUNNING), so this comes
    after it. Main thread only (Python's rule for signal handlers)."""

    def handler(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # whatever handles Ctrl-C now (Tune's, or Python's)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_console(embedded: bool) -> None:
    """Keep off the console what Ray and MLflow print that does not apply to a sweep; the
    progress display (console.py) is what a user watches. Settings a user made win.

    - Tune's output engine prints its configuration box ("Search algorithm SearchGenerator")
      and a TensorBoard hint whatever RunConfig(verbose=...) says; RAY_AIR_NEW_OUTPUT=0 selects
      its other engine, silent at verbose=0 (ray/tune/experimental/output.py, tune/tune.py).
    - TUNE_PRINT_ALL_TRIAL_ERRORS=0: Tune logs each failed attempt of a trial with its whole
      traceback (in colour); the display says which trial failed and why in one line, and
      where the traceback is: Tune's error file, and the MLflow run (failure_detail).
      Tune's closing "Trials did not complete: [<Tune ids>]" goes too: the counts say it.
    - On Ctrl-C, Tune's "Resume experiment with: Tuner.restore(...)" (the driver says how:
      `sweep resume`), and its complaint that trials interrupted before their first report
      have no metrics files (ray/tune/tune.py, ray/tune/analysis/experiment_analysis.py).
    - RAY_COLOR_PREFIX=0: the `(trainable pid=...)` prefix of the worker lines Ray forwards,
      without colour codes when the output is not a terminal (ray/_private/worker.py).
    - An embedded Ray (a new local cluster) announces that token authentication is on, its
      default; it stays on, unannounced (ray/_private/authentication/).
    - MLflow's INFO lines about creating its SQLite tables.
    Worker lines stay forwarded (log_to_driver): a trial's warnings and errors reach the user.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    if not is_terminal(sys.stdout):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    drop = [
        ("ray.tune.tune", "Trials did not complete"),  # Tune's ids of the failed trials
        ("ray.tune.tune", "Experiment has been interrupted"),  # "Tuner.restore(...)"
        ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for"),
    ]
    if embedded:
        drop.append(
            (
                "ray._private.authentication.authentication_token_setup",
                "Token authentication is enabled for this Ray cluster",
            )
        )
    for name, start in drop:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


class NotEnoughResources(Exception):
    pass


def check_resources(spec: SweepSpec, embedded: bool) -> None:
    """A trial asking for more than any node has would wait forever: say so before it starts.
    On a cluster that may still scale up (no node fits *now*) this is only a warning."""
    res = spec.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    best_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    best_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    problems = []
    if res.gpus_per_trial > best_gpu:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        problems.append(
            f"resources.gpus_per_trial is {res.gpus_per_trial:g} but no node has more than "
            f"{best_gpu:g} GPUs{seen}"
        )
    if res.cpus_per_trial > best_cpu:
        problems.append(
            f"resources.cpus_per_trial is {res.cpus_per_trial:g} but no node has more than "
            f"{best_cpu:g} CPUs"
        )
    if not problems:
        return
    if embedded:
        raise NotEnoughResources("; ".join(problems))
    for p in problems:
        print(f"warning: {p}; trials wait until the cluster has such a node", flush=True)


def _with_trial_resources(ctx: SweepContext, fn: Any, items: list, embedded: bool) -> list:
    """fn(item) for every item, each with a trial's resources. On a cluster: Ray tasks, where
    the nodes are. In an embedded CPU-only Ray: one after another in this process with all the
    cluster's CPUs, since a fresh Ray worker spends ~6 s importing torch, kdsweep and MLflow
    before it starts (bench/sweep_overhead.py)."""
    res = ctx.spec.resources
    if embedded and res.gpus_per_trial == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(ray.cluster_resources().get("CPU", 1))))
        try:
            return [fn(item) for item in items]
        finally:
            torch.set_num_threads(threads)

    @ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)
    def task(item: Any) -> Any:
        torch.set_num_threads(max(1, int(res.cpus_per_trial)))
        return fn(item)

    return ray.get([task.remote(item) for item in items])


def _finalize_early_stopped(ctx: SweepContext, results: Any, embedded: bool) -> int:
    """ASHA stops trials between reports, before they can test themselves: test their last
    checkpoints now. A test that fails marks that run FAILED with its reason; the others go on.
    Returns how many failed."""
    spec = ctx.spec
    checkpoints, tracker = ctx.checkpoints(), ctx.tracker()
    todo = []
    for r in results:
        if not r.config or r.error is not None or r.metrics.get("epoch", 0) >= spec.budget.epochs:
            continue
        config = TrialConfig.from_dict(r.config)
        run_id = checkpoints.run_id(config.key)
        if run_id and tracker.status(run_id) != "FINISHED":  # it reported: it checkpointed
            todo.append((config, run_id))
    if not todo:
        return 0
    print(f"testing {len(todo)} trials stopped early by ASHA ...", flush=True)

    def test_one(item: tuple[TrialConfig, str]) -> str | None:
        config, run_id = item
        try:
            finalize_from_state(ctx, config, ctx.checkpoints().state(config.key))
            return None
        except Exception as e:  # recorded on the run; the sweep goes on
            reason = f"testing the early-stopped trial failed: {type(e).__name__}: {e}"
            ctx.tracker().fail(run_id, reason)
            return f"{config.label}: {reason}"

    failures = [f for f in _with_trial_resources(ctx, test_one, todo, embedded) if f]
    for f in failures:
        print(f"warning: {f}", flush=True)
    return len(failures)


def _refit_best(ctx: SweepContext, embedded: bool) -> int:
    """spec.refit: retrain each cell's best configuration on train + validation for its final
    numbers, a run of kind `refit` tagged with the tuned run it retrains (`refit_of`). A refit
    finished before is left alone, one cut short continues from its checkpoint, so a resumed
    sweep only does what is missing. Returns how many failed (each recorded on its run)."""
    spec = ctx.spec
    if not spec.refit:
        return 0
    searcher = CellSearcher(spec, ctx.layout.optuna_url)
    todo = [c for cell in spec.cells() if (c := searcher.refit_config(cell)) is not None]
    if not todo:
        return 0
    print(
        f"refitting the best configuration of {len(todo)} cells on train + validation ...",
        flush=True,
    )

    def refit(config: TrialConfig) -> str | None:
        try:
            run_trial(ctx, config, lambda metrics, state: None)
        except Exception as e:  # the run is FAILED with its reason; the others go on
            return f"{config.label}: refit failed: {type(e).__name__}: {e}"
        run_id = ctx.checkpoints().run_id(config.key)
        got = ctx.tracker().metrics(run_id) if run_id else {}
        shown = ", ".join(  # clean, then each attack of the test suite
            f"{k.removeprefix('test/')}={v:.4f}" for k, v in sorted(got.items()) if k[:5] == "test/"
        )
        print(f"refit {config.label}: {shown}", flush=True)
        return None

    failures = [f for f in _with_trial_resources(ctx, refit, todo, embedded) if f]
    for f in failures:
        print(f"warning: {f}", flush=True)
    return len(failures)


def _train_teachers_first(ctx: SweepContext, embedded: bool) -> None:
    """The teacher cache's lock guards one machine; on an object store, trials on several
    machines could each train the same teacher. There the driver has every missing teacher
    trained first, one job per distinct teacher with a trial's resources, so that trials only
    load them. On a local or NFS folder trials share the lock and start at once."""
    spec = ctx.spec
    teachers = spec.all_teachers()
    if not teachers or not is_remote(ctx.layout.teachers):
        return
    print(
        f"teachers: {len(teachers)} in {ctx.layout.teachers}, training the missing ones", flush=True
    )

    def train(t: Any) -> str:
        device = pick_device(spec)
        _, record = get_teacher(ctx, t, get_splits(spec, device), device)
        return f"{t.label} ({record.hash[:10]})"

    # parents before the teachers fine-tuned from them, one generation at a time: two children
    # of one parent on two machines would otherwise each train it
    ready = [
        r
        for generation in teacher_generations(teachers)
        for r in _with_trial_resources(ctx, train, generation, embedded)
    ]
    print(f"teachers ready: {', '.join(ready)}", flush=True)


def _tuner_parts(spec: SweepSpec, ctx: SweepContext) -> tuple[Any, tune.RunConfig]:
    res = spec.resources
    trainable_ = tune.with_resources(
        tune.with_parameters(trainable, ctx=ctx),
        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial},
    )
    run_config = tune.RunConfig(
        name="tune",
        storage_path=ctx.layout.sweep,
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        verbose=0,
    )
    return trainable_, run_config


def tune_config(spec: SweepSpec, optuna_url: str, num_samples: int) -> tune.TuneConfig:
    """How Tune runs the sweep's trials: the per-cell search (CellSearcher) and early stopping
    (CellASHA, or none with `budget.early_stopping: false`). bench/tuning_quality.py runs
    this same loop with a trainable that evaluates a function instead of training."""
    scheduler = CellASHA(spec) if spec.budget.early_stopping else FIFOScheduler()
    return tune.TuneConfig(
        search_alg=CellSearcher(spec, optuna_url),
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=spec.resources.max_concurrent_trials,
        reuse_actors=True,
    )


def _snapshot_often() -> None:
    """Tune snapshots the experiment (trial list, searcher, scheduler) every 10 s or more by
    default; a killed driver then forgets the reports since. Trials keep their own checkpoints,
    so what it forgets is bookkeeping, but a 1 s period keeps that to one report per trial."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


def sweep_tracker(spec: SweepSpec, sweep_id: str) -> tuple[str, str, Tracker]:
    """The new sweep's tracking URI, MLflow experiment and tracker (tagging runs with
    `sweep_id`). A SQLite store's artifact root is named after the sweep (a checked name),
    never the experiment (any string)."""
    uri = resolve_tracking_uri(spec.storage.mlflow_tracking_uri)
    experiment = spec.storage.mlflow_experiment or spec.name
    # a store unreachable now is an error; later outages are waited out (patience.py)
    root = default_artifact_root(uri, spec.name)
    return uri, experiment, Tracker(uri, experiment, root, wait_first=False, sweep_id=sweep_id)


def run_sweep(spec: SweepSpec, address: str | None = None) -> bool:
    """Run a whole sweep; True when every trial ended, False when it was interrupted."""
    preflight.check(spec)  # stores and data reachable, before Ray starts (raises SpecError)
    layout = SweepLayout.of(spec)
    store = layout.store()
    if store.exists("tune"):
        raise SweepExists(
            f"sweep {spec.name!r} already exists at {layout.sweep}.\n"
            f"  continue it:   sweep resume {spec.name} --storage {layout.root}\n"
            f"  start over:    delete {layout.sweep} (and its MLflow experiment), or run "
            f"under a new name: sweep run FILE --name NEW"
        )
    embedded = init_ray(address)
    check_resources(spec, embedded)  # before anything is written
    store.write(dump_spec(spec).encode(), "sweep.yaml")

    # the sweep's own identity: its name may be a deleted sweep's, whose runs are in the same
    # experiment; every run is tagged with it and every query selects by it (tracking.py)
    sweep_id = uuid.uuid4().hex
    uri, experiment, tracker = sweep_tracker(spec, sweep_id)
    cells = spec.cells()
    total = spec.tuning_trials() + len(cells) * spec.repeats  # repeats: at most one set a cell
    parent = tracker.start_run(
        spec.name,
        tags={"kind": "sweep", "sweep": spec.name},
        params={"cells": len(cells), "trials": total},
    )
    tracker.log_artifacts(parent, {"sweep.yaml": dump_spec(spec)})
    state = {
        "mlflow_tracking_uri": uri,
        "experiment": experiment,
        "experiment_id": tracker.experiment_id,
        "parent_run_id": parent,
        "optuna": layout.optuna_url,
        "sweep_id": sweep_id,
    }
    write_state(store, state)  # without passwords
    driver_started(store)
    repeats = f" + {spec.repeats} seed repeats of each cell's best" if spec.repeats else ""
    print(
        f"sweep {spec.name}: {len(cells)} cells x {spec.budget.trials_per_cell} trials"
        f"{repeats} = {total} trials, {spec.budget.epochs} epochs each\n"
        f"MLflow: {ui_hint(uri, tracker.experiment_id)}",
        flush=True,
    )
    ctx = SweepContext(spec, layout, uri, experiment, parent, sweep_id)
    _train_teachers_first(ctx, embedded)
    _snapshot_often()
    trainable_, run_config = _tuner_parts(spec, ctx)
    console = _console(spec, total)
    run_config.callbacks = [Progress(ctx, console), TrialWatch(ctx, console)]
    tuner = tune.Tuner(
        trainable_,
        tune_config=tune_config(spec, layout.optuna_url, total),
        run_config=run_config,
    )
    try:
        return _fit(ctx, tuner, embedded, console)
    finally:
        driver_ended(store)


def _console(spec: SweepSpec, total: int) -> SweepConsole:
    return SweepConsole(
        [c.key for c in spec.cells()],
        per_cell=spec.budget.trials_per_cell + spec.repeats,
        total=total,
        objective=selection.rule(spec),
        epochs=spec.budget.epochs,
    )


def resume_sweep(name: str, storage: str | Path = "./sweeps", address: str | None = None) -> bool:
    """Continue a stopped sweep: finished trials are kept, unfinished and errored ones continue
    from their checkpoints, and trials Optuna knows but Tune's snapshot does not are handed
    out again (CellSearcher.reconcile). True when every trial ended."""
    opened = open_sweep(name, storage)
    layout, state, spec = opened.layout, opened.state, opened.spec
    tune_dir = layout.tune
    if not tune.Tuner.can_restore(tune_dir):
        raise FileNotFoundError(
            f"sweep {name!r} at {layout.sweep} has no Tune experiment to resume; it stopped "
            f"before its first trial was scheduled: delete {layout.sweep} and run it again"
        )
    uri = state["mlflow_tracking_uri"]
    sweep_id = state.get("sweep_id")
    if sweep_id is None:
        print(
            f"note: sweep {name} was made before sweeps had an id: its MLflow runs are "
            f"those tagged sweep={name}, a deleted sweep's of that name included",
            flush=True,
        )
    ctx = SweepContext(spec, layout, uri, state["experiment"], state["parent_run_id"], sweep_id)
    tracker = ctx.tracker()
    # a driver that died (SIGKILL, lost node) left runs RUNNING: KILLED until their trial
    # continues (it sets its run RUNNING again); its Optuna trials continue as they are
    close_stale(opened, optuna_too=False)
    driver_started(layout.store())
    tracker.resume_run(state["parent_run_id"], {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    total = spec.tuning_trials() + len(spec.cells()) * spec.repeats
    done, _ = sweep_progress(spec, layout, tracker)
    print(
        f"resuming sweep {name}: {done} of {total} trials ended before\n"
        f"MLflow: {ui_hint(uri, tracker.experiment_id)}",
        flush=True,
    )
    embedded = init_ray(address)
    check_resources(spec, embedded)
    _train_teachers_first(ctx, embedded)
    _snapshot_often()
    trainable_, _ = _tuner_parts(spec, ctx)
    tuner = tune.Tuner.restore(
        tune_dir,
        trainable=trainable_,
        resume_unfinished=True,
        resume_errored=True,
        restart_errored=False,
    )
    console = _console(spec, total)
    for c in cell_status(spec, layout, tracker):  # what ended before, as `sweep status` counts
        console.seed(
            c.cell,
            done=c.done + c.repeats_finished,
            stopped=c.stopped,
            failed=c.failed + c.repeats_failed,
            candidates=c.candidates,
        )
    # the pickled run config holds the first run's Progress, without a display: replace it
    tuner._local_tuner.get_run_config().callbacks = [
        Progress(ctx, console),
        TrialWatch(ctx, console),
    ]
    # ... and its searcher holds the Optuna URL without its password (CellSearcher.__getstate__)
    tuner._local_tuner._tune_config.search_alg.optuna_url = layout.optuna_url
    try:
        return _fit(ctx, tuner, embedded, console)
    finally:
        driver_ended(layout.store())


def _trial_slots(spec: SweepSpec) -> int:
    """How many trials the cluster can run at once now."""
    res, have = spec.resources, ray.cluster_resources()
    slots = int(have.get("CPU", 0) // res.cpus_per_trial)  # cpus_per_trial > 0 (spec)
    if res.gpus_per_trial:
        slots = min(slots, int(have.get("GPU", 0) // res.gpus_per_trial))
    if res.max_concurrent_trials:
        slots = min(slots, res.max_concurrent_trials)
    return max(1, slots)


def _fit(ctx: SweepContext, tuner: tune.Tuner, embedded: bool, console: SweepConsole) -> bool:
    """Run (or continue) the experiment under the progress display; end the parent run, or on
    an interruption leave nothing looking RUNNING and say how to go on. Ends with the
    best-per-cell table of `sweep status`."""
    spec, tracker = ctx.spec, ctx.tracker()
    # Tune lets a custom searcher have one trial waiting for resources at a time, so the
    # second trial's actor starts only once the first one runs; let every free slot have one.
    # Not more: TPE should suggest with as many results in as it can.
    pending = "TUNE_MAX_PENDING_TRIALS_PG"
    user_pending = os.environ.get(pending)
    if user_pending is None:
        os.environ[pending] = str(_trial_slots(spec))
    try:
        with console.showing():
            results = tuner.fit()
    finally:
        if user_pending is None:
            os.environ.pop(pending, None)
    took = console.elapsed()
    # Optuna hears of every tuning trial's end (complete, pruned, failed) from the searcher, a
    # repeat's end is its finished run; on Ctrl-C Tune saves its state and stops the running
    # trials, which stay RUNNING there
    ended, planned = sweep_progress(spec, ctx.layout, tracker)
    if ended < planned:
        killed = tracker.close_running(spec.name, "KILLED", "sweep interrupted")
        tracker.finish(ctx.parent_run_id, "KILLED")
        print(
            f"{status_table(spec, ctx.layout, tracker)}\n"
            f"sweep {spec.name} interrupted: {ended} of {planned} trials ended; "
            f"{len(killed)} runs marked KILLED until resumed\n"
            f"resume with: sweep resume {spec.name} --storage {ctx.layout.root}",
            flush=True,
        )
        return False
    failed = sum(r.error is not None for r in results)
    failed += _finalize_early_stopped(ctx, results, embedded)
    try:
        failed += _refit_best(ctx, embedded)
    except KeyboardInterrupt:  # Ctrl-C while refitting: the refits continue on resume
        killed = tracker.close_running(spec.name, "KILLED", "sweep interrupted")
        tracker.finish(ctx.parent_run_id, "KILLED")
        print(
            f"sweep {spec.name} interrupted while refitting; {len(killed)} runs marked KILLED "
            f"until resumed\nresume with: sweep resume {spec.name} --storage {ctx.layout.root}",
            flush=True,
        )
        return False
    tracker.set_tags(ctx.parent_run_id, {"trials": str(len(results)), "failed": str(failed)})
    tracker.finish(ctx.parent_run_id)
    print(
        f"sweep {spec.name} finished: {len(results)} trials, {failed} failed "
        f"(in {duration(took)})\n"
        f"MLflow: {ui_hint(ctx.tracking_uri, tracker.experiment_id)}\n"
        f"status: sweep status {spec.name} --storage {ctx.layout.root}\n\n"
        f"{status_table(spec, ctx.layout, tracker)}",
        flush=True,
    )
    return True
