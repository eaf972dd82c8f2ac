"""Ray Tune: one experiment for the whole sweep, one Optuna study and one ASHA per grid cell.

Why not Ray's OptunaSearch directly: it refuses grid_search axes, and one study over all cells
would let a strong cell starve the others of trials. `CellSearcher` hands out suggestions
round-robin over cells that still lack trials, asks each cell's own study (ask/tell, all studies
in one Optuna storage), and returns FINISHED when every cell has its budget. `CellASHA` applies
successive halving within a cell only: comparing an ARD trial with a KD trial would stop whole
cells, and the table must be filled.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .checkpoints import FAILED, STOPPED, trial_key, trial_label
from .space import is_searched
from .spec import SweepSpec, dump_spec
from .status import study_name, sweep_progress
from .store import Store, absolute, is_remote, join
from .tracking import Tracker, default_artifact_root, resolve_tracking_uri, ui_hint
from .trial import (
    SweepContext,
    finalize_from_state,
    get_splits,
    get_teacher,
    pick_device,
    run_trial,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SweepExists(Exception):
    pass


def make_sampler(spec: SweepSpec, cell_index: int) -> optuna.samplers.BaseSampler:
    seed = spec.seed * 1000 + cell_index
    kind = spec.optuna.sampler
    if kind == "auto":
        kind = "nsga2" if len(spec.objectives) > 1 else "tpe"
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.optuna.n_startup_trials)


class CellSearcher(Searcher):
    """One Optuna study per grid cell behind Tune's Searcher interface."""

    def __init__(self, spec: SweepSpec, optuna_url: str) -> None:
        super().__init__(metric=spec.objectives[0].metric, mode=spec.objectives[0].mode)
        self.spec = spec
        self.optuna_url = optuna_url
        self.cells = spec.cells()
        self.handed: dict[str, list[int]] = {c.key: [] for c in self.cells}  # cell indices
        self.live: dict[str, tuple[str, int, int]] = {}  # tune id -> (cell, optuna id, number)
        self.next_cell = 0
        self.orphans: list[tuple[str, int]] = []  # (cell, optuna number) to hand out again
        self.repeats: dict[str, int] = {c.key: 0 for c in self.cells}  # repeats handed out
        self.no_best: set[str] = set()  # cells whose tuning ended without a finished trial
        # Optuna numbers of each cell's trials that ended: in memory, since Tune asks for a
        # suggestion every loop step while repeats wait for a cell (no database query there)
        self.ended: dict[str, set[int]] = {c.key: set() for c in self.cells}
        self._reconciled = True
        self._studies: dict[str, optuna.Study] = {}

    def __getstate__(self) -> dict[str, Any]:  # Optuna studies hold DB engines: not picklable
        state = dict(self.__dict__)
        state["_studies"] = {}
        return state

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True

    def study(self, key: str) -> optuna.Study:
        if key not in self._studies:
            index = [c.key for c in self.cells].index(key)
            self._studies[key] = optuna.create_study(
                study_name=study_name(self.spec.name, key),
                storage=optuna.storages.RDBStorage(self.optuna_url),
                directions=[
                    ("maximize" if o.mode == "max" else "minimize") for o in self.spec.objectives
                ],
                sampler=make_sampler(self.spec, index),
                load_if_exists=True,
            )
        return self._studies[key]

    def reconcile(self) -> list[tuple[str, int]]:
        """After a restore: find the Optuna trials this searcher's snapshot never handed to
        Tune (asked after the driver's last snapshot, then the driver died). They are handed
        out again with the same parameters and cell index, so the trial finds its checkpoint
        and MLflow run: nothing is asked twice and no Optuna trial is left RUNNING."""
        found = []
        for cell in self.cells:
            handed = set(self.handed[cell.key])
            for t in self.study(cell.key).get_trials(deepcopy=False):
                if t.state.is_finished():  # also those told after the snapshot
                    self.ended[cell.key].add(t.number)
                if t.number not in handed:
                    found.append((t.datetime_start, cell.key, t.number))
        self.orphans += [(key, number) for _, key, number in sorted(found)]  # as first asked
        self._reconciled = True
        return list(self.orphans)

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self._reconciled:
            self.reconcile()
        if self.orphans:
            key, number = self.orphans.pop(0)
            (ot,) = [t for t in self.study(key).get_trials(deepcopy=False) if t.number == number]
            cell = next(c for c in self.cells if c.key == key)
            return self._handout(trial_id, cell, number, ot._trial_id, ot.params)
        n = len(self.cells)
        budget = self.spec.budget.trials_per_cell
        for i in range(n):
            cell = self.cells[(self.next_cell + i) % n]
            if len(self.handed[cell.key]) < budget:
                self.next_cell = (self.next_cell + i + 1) % n
                space = self.spec.cell_space(cell.method)
                dists = {k: v.distribution() for k, v in space.items() if is_searched(v)}
                ot = self.study(cell.key).ask(dists)
                return self._handout(trial_id, cell, ot.number, ot._trial_id, ot.params)
        return self._suggest_repeat(trial_id)

    def _suggest_repeat(self, trial_id: str) -> dict | str | None:
        """Seed repeats of each cell's best configuration, once that cell's tuning has ended
        (its best is final then). None while some cell still tunes: Tune asks again later."""
        waiting = False
        for cell in self.cells:
            if self.repeats[cell.key] >= self.spec.repeats or cell.key in self.no_best:
                continue
            if not self._tuning_ended(cell.key):
                waiting = True
                continue
            best = self.best_trial(cell.key)
            if best is None:
                self.no_best.add(cell.key)
                continue
            self.repeats[cell.key] += 1
            config = self._config(cell, best.number, best.params)
            return config | {
                "seed": self.spec.repeat_seed(self.repeats[cell.key]),
                "repeat": self.repeats[cell.key],
                "trial_id": trial_id,
            }
        return None if waiting else Searcher.FINISHED

    def _tuning_ended(self, key: str) -> bool:
        handed = self.handed[key]
        return len(handed) >= self.spec.budget.trials_per_cell and set(handed) <= self.ended[key]

    def best_trial(self, key: str) -> optuna.trial.FrozenTrial | None:
        """The cell's best finished trial by the first objective (ties: the one tried first),
        as the report chooses it."""
        done = [
            t
            for t in self.study(key).get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE
        ]
        if not done:
            return None
        sign = -1 if self.spec.objectives[0].mode == "max" else 1
        return min(done, key=lambda t: (sign * t.values[0], t.number))

    def _config(self, cell: Any, index: int, params: dict[str, Any]) -> dict[str, Any]:
        space = self.spec.cell_space(cell.method)
        return {
            "cell": cell.key,
            "teacher_loss": cell.teacher_loss,
            "method": cell.method,
            "train_attack": cell.train_attack,
            "hp": {k: v for k, v in space.items() if not is_searched(v)} | params,
            "seed": self.spec.seed + index,
            "cell_index": index,
            "optuna_number": index,
        }

    def _handout(
        self, trial_id: str, cell: Any, index: int, ot_id: int, params: dict[str, Any]
    ) -> dict[str, Any]:
        """The trial config. Its identity in the cell (checkpoints, MLflow run, seed) is the
        Optuna trial's number in the cell's study."""
        self.handed[cell.key].append(index)
        self.live[trial_id] = (cell.key, ot_id, index)
        return self._config(cell, index, params) | {"trial_id": trial_id}

    def _finished(self, key: str, ot_id: int) -> bool:
        return self.study(key)._storage.get_trial(ot_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.live or len(self.spec.objectives) > 1:
            return
        key, ot_id, _ = self.live[trial_id]
        metric = self.spec.objectives[0].metric
        if metric in result and "epoch" in result and not self._finished(key, ot_id):
            self.study(key)._storage.set_trial_intermediate_value(
                ot_id, int(result["epoch"]), float(result[metric])
            )

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self.live:
            return
        key, ot_id, number = self.live.pop(trial_id)
        self.ended[key].add(number)
        if self._finished(key, ot_id):  # told before the driver died; Optuna keeps its verdict
            return
        study = self.study(key)
        state = optuna.trial.TrialState
        if error or not result:
            study.tell(number, state=state.FAIL)
        elif result.get("epoch", 0) >= self.spec.budget.epochs:
            study.tell(number, [float(result[o.metric]) for o in self.spec.objectives])
        else:  # stopped early by ASHA
            study.tell(number, state=state.PRUNED)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self._reconciled = False  # the storage may know trials the snapshot does not


class CellASHA(FIFOScheduler):
    """Asynchronous successive halving (Li et al. 2020) run separately inside each cell."""

    def __init__(self, spec: SweepSpec) -> None:
        super().__init__()
        b, o = spec.budget, spec.objectives[0]
        self._kw = dict(
            time_attr="epoch",  # not Tune's iteration count, which restarts on restore
            metric=o.metric,
            mode=o.mode,
            max_t=b.epochs,
            grace_period=b.grace_period,
            reduction_factor=b.reduction_factor,
        )
        self._per_cell: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _asha(self, trial: Any) -> AsyncHyperBandScheduler:
        cell = trial.config["cell"]
        if cell not in self._per_cell:
            self._per_cell[cell] = AsyncHyperBandScheduler(**self._kw)
        return self._per_cell[cell]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not trial.config.get("repeat"):  # repeats run their whole budget: never stopped
            self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if trial.config.get("repeat"):
            return TrialScheduler.CONTINUE
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if not trial.config.get("repeat"):
            self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        asha = self._asha(trial)
        if trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def trainable(config: dict[str, Any], ctx: SweepContext) -> None:
    """The Tune function trainable. Progress lives in the sweep's own checkpoints
    (checkpoints.py), keyed by the trial's cell and index, so Tune gets metrics only."""
    for name in ("ray.train", "ray.tune"):  # per-report INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    threads = max(1, int(ctx.spec.resources.cpus_per_trial))
    where = {"ray_node_id": ray.get_runtime_context().get_node_id()}
    run_trial(
        ctx, config, lambda metrics, _state: tune.report(metrics), threads=threads, where=where
    )


class Progress(tune.Callback):
    """One line per finished trial, and the bookkeeping Tune's own events call for: a trial
    ASHA stopped is marked so a restart does not train it on; a trial that failed for good
    (retries spent, worker lost) has its MLflow run ended FAILED with the reason."""

    def __init__(self, ctx: SweepContext, total: int, done: int = 0) -> None:
        self.ctx, self.spec = ctx, ctx.spec
        self.total, self.done, self.t0 = total, done, time.time()

    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        c, r = trial.config, trial.last_result or {}
        metric = self.spec.objectives[0].metric
        val = r.get(metric)
        shown = f"{metric}={val:.4f}" if isinstance(val, float) else "no result"
        print(
            f"[{self.done}/{self.total} trials, {time.time() - self.t0:.0f}s] "
            f"{trial_label(c) if c else trial.trial_id} {what}: {shown} "
            f"(epoch {r.get('epoch', 0)}/{self.spec.budget.epochs})",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        if epoch < self.spec.budget.epochs:
            self.ctx.checkpoints().set_outcome(trial_key(trial.config), STOPPED, "asha")
        self._line(trial, "done" if epoch >= self.spec.budget.epochs else "stopped by ASHA")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        c = trial.config
        outcome = self.ctx.checkpoints().outcome(trial_key(c))
        if outcome and outcome["status"] == FAILED:  # the restart only re-raises the reason
            return
        print(
            f"{trial_label(c)} failed, retrying from its checkpoint "
            f"({trial.num_failures}/{self.spec.resources.max_failures})",
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = trial_key(trial.config)
        run_id = self.ctx.checkpoints().run_id(key)
        if run_id:  # the trial ends its run itself when it can; a killed worker cannot
            tracker = self.ctx.tracker()
            if tracker.status(run_id) == "RUNNING":
                tracker.fail(run_id, "worker_lost", str(getattr(trial, "error_msg", "")))
        self._line(trial, "FAILED")


# --- the driver ---------------------------------------------------------------------------------
def sweep_paths(spec: SweepSpec) -> dict[str, str]:
    """Where a sweep keeps its files: local folders made absolute, or URIs (s3://, gs://)."""
    root = absolute(spec.storage.path)
    return {"root": root, "sweep": join(root, spec.name), "teachers": join(root, "teachers")}


def teacher_store(spec: SweepSpec) -> str:
    """Where the teacher cache lives: a URI as given, a local folder made absolute."""
    t = spec.storage.teachers
    return absolute(t) if t else sweep_paths(spec)["teachers"]


def optuna_url(spec: SweepSpec) -> str:
    # a URI storage.path comes with storage.optuna (spec validation): SQLite needs a local file
    return spec.storage.optuna or f"sqlite:///{sweep_paths(spec)['sweep']}/optuna.db"


def init_ray(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start an embedded Ray on loopback.
    True when Ray is embedded (this machine is all there is)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return not address
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback (DESIGN §3.8)
    ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


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
        key = trial_key(r.config)
        run_id = checkpoints.run_id(key)
        if run_id and tracker.status(run_id) != "FINISHED":  # it reported: it checkpointed
            todo.append((r.config, key, run_id))
    if not todo:
        return 0
    print(f"testing {len(todo)} trials stopped early by ASHA ...", flush=True)

    def test_one(item: tuple[dict, str, str]) -> str | None:
        config, key, run_id = item
        try:
            finalize_from_state(ctx, config, ctx.checkpoints().state(key))
            return None
        except Exception as e:  # recorded on the run; the sweep goes on
            reason = f"testing the early-stopped trial failed: {type(e).__name__}: {e}"
            ctx.tracker().fail(run_id, reason)
            return f"{trial_label(config)}: {reason}"

    failures = [f for f in _with_trial_resources(ctx, test_one, todo, embedded) if f]
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
    if not teachers or not is_remote(ctx.teacher_dir):
        return
    print(f"teachers: {len(teachers)} in {ctx.teacher_dir}, training the missing ones", flush=True)

    def train(t: Any) -> str:
        device = pick_device(spec)
        _, record = get_teacher(ctx, t, get_splits(spec, device), device)
        return f"{t.label} ({record.hash[:10]})"

    ready = _with_trial_resources(ctx, train, teachers, embedded)
    print(f"teachers ready: {', '.join(ready)}", flush=True)


def _tuner_parts(spec: SweepSpec, ctx: SweepContext) -> tuple[Any, tune.RunConfig]:
    res = spec.resources
    trainable_ = tune.with_resources(
        tune.with_parameters(trainable, ctx=ctx),
        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial},
    )
    run_config = tune.RunConfig(
        name="tune",
        storage_path=ctx.sweep_dir,
        failure_config=tune.FailureConfig(max_failures=res.max_failures),
        verbose=0,
    )
    return trainable_, run_config


def _snapshot_often() -> None:
    """Tune snapshots the experiment (trial list, searcher, scheduler) every 10 s or more by
    default; a killed driver then forgets the reports since. Trials keep their own checkpoints,
    so what it forgets is bookkeeping, but a 1 s period keeps that to one report per trial."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


def run_sweep(spec: SweepSpec, address: str | None = None) -> bool:
    """Run a whole sweep; True when every trial ended, False when it was interrupted."""
    paths = sweep_paths(spec)
    store = Store(paths["sweep"])
    if store.exists("tune"):
        raise SweepExists(
            f"sweep {spec.name!r} already exists at {paths['sweep']}.\n"
            f"  continue it:   sweep resume {spec.name} --storage {paths['root']}\n"
            f"  start over:    delete {paths['sweep']} (and its MLflow experiment), or run "
            f"under a new name: sweep run FILE --name NEW"
        )
    embedded = init_ray(address)
    check_resources(spec, embedded)  # before anything is written
    store.write(dump_spec(spec).encode(), "sweep.yaml")

    uri = resolve_tracking_uri(spec.storage.mlflow_tracking_uri)
    experiment = spec.storage.mlflow_experiment or spec.name
    tracker = Tracker(uri, experiment, default_artifact_root(uri, experiment))
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
        "optuna": optuna_url(spec),
    }
    store.write(json.dumps(state, indent=2).encode(), "state.json")
    repeats = f" + {spec.repeats} seed repeats of each cell's best" if spec.repeats else ""
    print(
        f"sweep {spec.name}: {len(cells)} cells x {spec.budget.trials_per_cell} trials"
        f"{repeats} = {total} trials, {spec.budget.epochs} epochs each\n"
        f"MLflow: {ui_hint(uri, tracker.experiment_id)}",
        flush=True,
    )
    ctx = SweepContext(spec, paths["sweep"], teacher_store(spec), uri, experiment, parent)
    _train_teachers_first(ctx, embedded)
    _snapshot_often()
    trainable_, run_config = _tuner_parts(spec, ctx)
    run_config.callbacks = [Progress(ctx, total)]
    tuner = tune.Tuner(
        trainable_,
        tune_config=tune.TuneConfig(
            search_alg=CellSearcher(spec, optuna_url(spec)),
            scheduler=CellASHA(spec),
            num_samples=total,
            max_concurrent_trials=spec.resources.max_concurrent_trials,
            reuse_actors=True,
        ),
        run_config=run_config,
    )
    return _fit(ctx, tuner, paths["root"], optuna_url(spec), embedded)


def resume_sweep(name: str, storage: str | Path = "./sweeps", address: str | None = None) -> bool:
    """Continue a stopped sweep: finished trials are kept, unfinished and errored ones continue
    from their checkpoints, and trials Optuna knows but Tune's snapshot does not are handed
    out again (CellSearcher.reconcile). True when every trial ended."""
    from .status import open_sweep

    sweep_dir, state, spec = open_sweep(name, storage)
    tune_dir = f"{sweep_dir}/tune"
    if not tune.Tuner.can_restore(tune_dir):
        raise FileNotFoundError(
            f"sweep {name!r} at {sweep_dir} has no Tune experiment to resume; it stopped before "
            f"its first trial was scheduled: delete {sweep_dir} and run it again"
        )
    uri = state["mlflow_tracking_uri"]
    ctx = SweepContext(
        spec, sweep_dir, teacher_store(spec), uri, state["experiment"], state["parent_run_id"]
    )
    tracker = ctx.tracker()
    tracker.resume_run(state["parent_run_id"], {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    total = spec.tuning_trials() + len(spec.cells()) * spec.repeats
    done, _ = sweep_progress(spec, state["optuna"], tracker.client, tracker.experiment_id)
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
    # the pickled run config holds the first run's Progress (its clock and counts): replace it
    tuner._local_tuner.get_run_config().callbacks = [Progress(ctx, total, done)]
    return _fit(ctx, tuner, absolute(storage), state["optuna"], embedded)


def _trial_slots(spec: SweepSpec) -> int:
    """How many trials the cluster can run at once now."""
    res, have = spec.resources, ray.cluster_resources()
    slots = int(have.get("CPU", 0) // res.cpus_per_trial)  # cpus_per_trial > 0 (spec)
    if res.gpus_per_trial:
        slots = min(slots, int(have.get("GPU", 0) // res.gpus_per_trial))
    if res.max_concurrent_trials:
        slots = min(slots, res.max_concurrent_trials)
    return max(1, slots)


def _fit(ctx: SweepContext, tuner: tune.Tuner, root: str, optuna_db: str, embedded: bool) -> bool:
    """Run (or continue) the experiment; end the parent run, or on an interruption leave
    nothing looking RUNNING and say how to go on."""
    spec, tracker = ctx.spec, ctx.tracker()
    # Tune lets a custom searcher have one trial waiting for resources at a time, so the
    # second trial's actor starts only once the first one runs; let every free slot have one.
    # Not more: TPE should suggest with as many results in as it can.
    pending = "TUNE_MAX_PENDING_TRIALS_PG"
    user_pending = os.environ.get(pending)
    if user_pending is None:
        os.environ[pending] = str(_trial_slots(spec))
    try:
        results = tuner.fit()
    finally:
        if user_pending is None:
            os.environ.pop(pending, None)
    # Optuna hears of every tuning trial's end (complete, pruned, failed) from the searcher, a
    # repeat's end is its finished run; on Ctrl-C Tune saves its state and stops the running
    # trials, which stay RUNNING there
    ended, planned = sweep_progress(spec, optuna_db, tracker.client, tracker.experiment_id)
    if ended < planned:
        killed = tracker.close_running(spec.name, "KILLED", "sweep interrupted")
        tracker.finish(ctx.parent_run_id, "KILLED")
        print(
            f"sweep {spec.name} interrupted: {ended} of {planned} trials ended; "
            f"{len(killed)} runs marked KILLED until resumed\n"
            f"resume with: sweep resume {spec.name} --storage {root}",
            flush=True,
        )
        return False
    failed = sum(r.error is not None for r in results)
    failed += _finalize_early_stopped(ctx, results, embedded)
    tracker.set_tags(ctx.parent_run_id, {"trials": str(len(results)), "failed": str(failed)})
    tracker.finish(ctx.parent_run_id)
    print(
        f"sweep {spec.name} finished: {len(results)} trials, {failed} failed\n"
        f"status: sweep status {spec.name} --storage {root}\n"
        f"MLflow: {ui_hint(ctx.tracking_uri, tracker.experiment_id)}",
        flush=True,
    )
    return True
