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
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import Searcher

from .space import is_searched
from .spec import SweepSpec, dump_spec
from .tracking import Tracker, default_artifact_root, resolve_tracking_uri, ui_hint
from .trial import SweepContext, finalize_from_state, load_state, run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SweepExists(Exception):
    pass


def study_name(spec_name: str, cell_key: str) -> str:
    return f"{spec_name}/{cell_key}"


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
        self.asked = {c.key: 0 for c in self.cells}
        self.live: dict[str, tuple[str, int, int]] = {}  # tune id -> (cell, optuna id, number)
        self.next_cell = 0
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

    def suggest(self, trial_id: str) -> dict | str | None:
        n = len(self.cells)
        budget = self.spec.budget.trials_per_cell
        for i in range(n):
            cell = self.cells[(self.next_cell + i) % n]
            if self.asked[cell.key] < budget:
                self.next_cell = (self.next_cell + i + 1) % n
                break
        else:
            return Searcher.FINISHED
        space = self.spec.cell_space(cell.method)
        dists = {k: v.distribution() for k, v in space.items() if is_searched(v)}
        ot = self.study(cell.key).ask(dists)
        index = self.asked[cell.key]
        self.asked[cell.key] += 1
        self.live[trial_id] = (cell.key, ot._trial_id, ot.number)
        hp = {k: v for k, v in space.items() if not is_searched(v)} | ot.params
        return {
            "cell": cell.key,
            "teacher_loss": cell.teacher_loss,
            "method": cell.method,
            "train_attack": cell.train_attack,
            "hp": hp,
            "seed": self.spec.seed + index,
            "cell_index": index,
            "optuna_number": ot.number,
            "trial_id": trial_id,
        }

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.live or len(self.spec.objectives) > 1:
            return
        key, ot_id, _ = self.live[trial_id]
        metric = self.spec.objectives[0].metric
        if metric in result and "epoch" in result:
            self.study(key)._storage.set_trial_intermediate_value(
                ot_id, int(result["epoch"]), float(result[metric])
            )

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self.live:
            return
        key, _, number = self.live.pop(trial_id)
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


class CellASHA(FIFOScheduler):
    """Asynchronous successive halving (Li et al. 2020) run separately inside each cell."""

    def __init__(self, spec: SweepSpec) -> None:
        super().__init__()
        b, o = spec.budget, spec.objectives[0]
        self._kw = dict(
            time_attr="training_iteration",
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
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
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
    """The Tune function trainable: resume from Tune's checkpoint if there is one."""
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)

    def report(metrics: dict[str, float], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    for name in ("ray.train", "ray.tune"):  # per-checkpoint INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    threads = max(1, int(ctx.spec.resources.cpus_per_trial))
    run_trial(ctx, config, report, resume=resume, threads=threads)


class Progress(tune.Callback):
    """One line per finished trial: what a researcher watching a long sweep wants to see."""

    def __init__(self, spec: SweepSpec, total: int) -> None:
        self.spec, self.total, self.done, self.t0 = spec, total, 0, time.time()
        self.best: dict[str, float] = {}

    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        c, r = trial.config, trial.last_result or {}
        metric = self.spec.objectives[0].metric
        val = r.get(metric)
        shown = f"{metric}={val:.4f}" if isinstance(val, float) else "no result"
        print(
            f"[{self.done}/{self.total} trials, {time.time() - self.t0:.0f}s] "
            f"{c.get('cell')}#{c.get('cell_index')} {what}: {shown} "
            f"(epoch {r.get('epoch', 0)}/{self.spec.budget.epochs})",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "FAILED")


# --- the driver ---------------------------------------------------------------------------------
def sweep_paths(spec: SweepSpec) -> dict[str, Path]:
    root = Path(spec.storage.path).expanduser().resolve()
    return {
        "root": root,
        "sweep": root / spec.name,
        "tune": root / spec.name / "tune",
        "teachers": root / "teachers",
    }


def teacher_store(spec: SweepSpec) -> str:
    """Where the teacher cache lives: a URI as given, a local folder made absolute."""
    t = spec.storage.teachers
    if t and "://" in t:
        return t
    return str(Path(t).expanduser().resolve()) if t else str(sweep_paths(spec)["teachers"])


def optuna_url(spec: SweepSpec) -> str:
    return spec.storage.optuna or f"sqlite:///{sweep_paths(spec)['sweep'] / 'optuna.db'}"


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); else start an embedded Ray on loopback."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback (DESIGN §3.8)
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)


def _finalize_early_stopped(ctx: SweepContext, results: Any) -> int:
    """ASHA stops trials between reports, before they can test themselves: test their last
    checkpoints now, as Ray tasks with the trials' resources."""
    spec = ctx.spec
    res = spec.resources
    todo = []
    for r in results:
        if (
            r.error is None
            and r.checkpoint is not None
            and r.metrics.get("epoch", 0) < spec.budget.epochs
        ):
            todo.append((r.config, r.checkpoint))
    if not todo:
        return 0
    print(f"testing {len(todo)} trials stopped early by ASHA ...", flush=True)

    @ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)
    def finalize_task(config: dict, checkpoint: tune.Checkpoint) -> None:
        torch.set_num_threads(max(1, int(res.cpus_per_trial)))
        with checkpoint.as_directory() as d:
            state = load_state(d)
        finalize_from_state(ctx, config, state)

    ray.get([finalize_task.remote(c, ck) for c, ck in todo])
    return len(todo)


def run_sweep(spec: SweepSpec, address: str | None = None) -> Any:
    """Run a whole sweep; returns Tune's ResultGrid."""
    paths = sweep_paths(spec)
    if paths["tune"].exists():
        raise SweepExists(
            f"sweep {spec.name!r} already exists at {paths['sweep']}; run it under a new name "
            f"(sweep run FILE --name NEW) or delete that folder to start over"
        )
    paths["sweep"].mkdir(parents=True, exist_ok=True)
    (paths["sweep"] / "sweep.yaml").write_text(dump_spec(spec))

    uri = resolve_tracking_uri(spec.storage.mlflow_tracking_uri)
    experiment = spec.storage.mlflow_experiment or spec.name
    tracker = Tracker(uri, experiment, default_artifact_root(uri, experiment))
    cells = spec.cells()
    total = len(cells) * spec.budget.trials_per_cell
    parent = tracker.start_run(
        spec.name,
        tags={"kind": "sweep", "sweep": spec.name},
        params={"cells": len(cells), "trials": total},
    )
    tracker.log_artifacts(parent, {"sweep.yaml": dump_spec(spec)})
    (paths["sweep"] / "state.json").write_text(
        json.dumps(
            {
                "mlflow_tracking_uri": uri,
                "experiment": experiment,
                "experiment_id": tracker.experiment_id,
                "parent_run_id": parent,
                "optuna": optuna_url(spec),
            },
            indent=2,
        )
    )
    print(
        f"sweep {spec.name}: {len(cells)} cells x {spec.budget.trials_per_cell} trials = {total} "
        f"trials, {spec.budget.epochs} epochs each\nMLflow: {ui_hint(uri, tracker.experiment_id)}",
        flush=True,
    )

    ctx = SweepContext(spec, str(paths["sweep"]), teacher_store(spec), uri, experiment, parent)
    init_ray(address)
    # Tune snapshots the experiment after every checkpoint (num_to_keep=1): that is what bounds
    # the loss on a killed driver, so its "snapshotting may become a bottleneck" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    res = spec.resources
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(trainable, ctx=ctx),
            {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial},
        ),
        tune_config=tune.TuneConfig(
            search_alg=CellSearcher(spec, optuna_url(spec)),
            scheduler=CellASHA(spec),
            num_samples=total,
            max_concurrent_trials=res.max_concurrent_trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(paths["sweep"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[Progress(spec, total)],
            verbose=0,
        ),
    )
    results = tuner.fit()
    _finalize_early_stopped(ctx, results)
    failed = sum(r.error is not None for r in results)
    tracker.set_tags(parent, {"trials": str(len(results)), "failed": str(failed)})
    tracker.finish(parent)
    print(
        f"sweep {spec.name} finished: {len(results)} trials, {failed} failed\n"
        f"status: sweep status {spec.name} --storage {paths['root']}\n"
        f"MLflow: {ui_hint(uri, tracker.experiment_id)}",
        flush=True,
    )
    return results
