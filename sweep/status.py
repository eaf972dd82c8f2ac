"""`sweep status NAME`: per cell, trials done / running / failed and the best value so far.

Read from the Optuna storage, the one place the searcher records every trial's fate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import yaml
from mlflow import MlflowClient

from .spec import SweepSpec, parse_spec
from .store import Store, absolute, join


def study_name(sweep: str, cell_key: str) -> str:
    """The Optuna study of one grid cell (all cells' studies share one storage)."""
    return f"{sweep}/{cell_key}"


def ended_trials(sweep: str, optuna_url: str) -> int:
    """Trials of `sweep` that Optuna saw end (complete, pruned or failed)."""
    storage = optuna.storages.RDBStorage(optuna_url)
    n = 0
    for s in optuna.get_all_study_summaries(storage):
        if s.study_name.startswith(study_name(sweep, "")):
            study = optuna.load_study(study_name=s.study_name, storage=storage)
            n += sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    return n


def cells_with_best(spec: SweepSpec, optuna_url: str) -> int:
    """Cells with a finished (COMPLETE) trial: each gets `repeats` seed repeats."""
    storage = optuna.storages.RDBStorage(optuna_url)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    n = 0
    for cell in spec.cells():
        sname = study_name(spec.name, cell.key)
        if sname in names:
            trials = optuna.load_study(study_name=sname, storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
            )
            n += bool(trials)
    return n


def repeat_runs(client: MlflowClient, experiment_id: str, sweep: str) -> list[Any]:
    """The student runs of `sweep` that are seed repeats (tagged `repeat`)."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.kind = 'student' and tags.sweep = '{sweep}' and tags.repeat LIKE '%'",
        max_results=10000,
    )


def sweep_progress(
    spec: SweepSpec, optuna_url: str, client: MlflowClient, experiment_id: str
) -> tuple[int, int]:
    """(trials ended, trials planned). Tuning trials end in Optuna; seed repeats are not
    Optuna trials, so theirs is the MLflow run's end (finished or failed)."""
    ended, planned = ended_trials(spec.name, optuna_url), spec.tuning_trials()
    if spec.repeats:
        planned += spec.repeats * cells_with_best(spec, optuna_url)
        runs = repeat_runs(client, experiment_id, spec.name)
        ended += sum(r.info.status in ("FINISHED", "FAILED") for r in runs)
    return ended, planned


def open_sweep(name: str, storage: str | Path = "./sweeps") -> tuple[str, dict, SweepSpec]:
    """A started sweep's location (a local folder or a URI), its state.json (MLflow, Optuna)
    and its resolved spec."""
    where = join(storage, name)
    store = Store(where)
    raw = store.read("state.json")
    if raw is None:
        raise FileNotFoundError(f"no sweep {name!r} under {absolute(storage)} (give --storage)")
    state = json.loads(raw)
    text = store.read("sweep.yaml") or b""
    spec = parse_spec(yaml.safe_load(text.decode()), store.location("sweep.yaml"))
    return where, state, spec


def sweep_status(name: str, storage: str | Path = "./sweeps") -> str:
    _, state, spec = open_sweep(name, storage)
    storage_obj = optuna.storages.RDBStorage(state["optuna"])
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage_obj)}
    S = optuna.trial.TrialState
    obj = spec.objectives[0]
    repeats: dict[str, list[Any]] = {}
    if spec.repeats:
        client = MlflowClient(state["mlflow_tracking_uri"])
        for r in repeat_runs(client, state["experiment_id"], name):
            repeats.setdefault(r.data.tags.get("cell", ""), []).append(r)
    rep_col = f" {'repeats':>8}" if spec.repeats else ""
    lines = [
        f"sweep {name}: objective {obj.mode} {obj.metric}",
        f"{'cell':<28} {'done':>5} {'stopped':>8} {'running':>8} {'failed':>7} {'todo':>5}"
        f"{rep_col}  best",
    ]
    for cell in spec.cells():
        sname = study_name(name, cell.key)
        trials = []
        if sname in existing:
            trials = optuna.load_study(study_name=sname, storage=storage_obj).get_trials(
                deepcopy=False
            )
        count = {st: sum(t.state == st for t in trials) for st in S}
        done = [t for t in trials if t.state == S.COMPLETE]
        best = ""
        if done:
            pick = max if obj.mode == "max" else min
            b = pick(done, key=lambda t: t.values[0])
            best = f"{b.values[0]:.4f} ({', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in b.params.items())})"
        todo = spec.budget.trials_per_cell - len(trials)
        rep = ""
        if spec.repeats:  # finished of planned
            ok = sum(r.info.status == "FINISHED" for r in repeats.get(cell.key, []))
            rep = f" {f'{ok}/{spec.repeats}':>8}"
        lines.append(
            f"{cell.key:<28} {count[S.COMPLETE]:>5} {count[S.PRUNED]:>8} "
            f"{count[S.RUNNING]:>8} {count[S.FAIL]:>7} {todo:>5}{rep}  {best}"
        )
    lines.append(f"MLflow: {state['mlflow_tracking_uri']} experiment {state['experiment']}")
    return "\n".join(lines)
