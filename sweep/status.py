"""`sweep status NAME`: per cell, trials done / running / failed and the best value so far.

Read from the Optuna storage, the one place the searcher records every tuning trial's fate, and
for seed repeats from MLflow (through the tracker). The best is chosen by selection.py's rule.
`status_table` builds the same table from a sweep already open (the end of `sweep run`), and
`cell_status` gives its rows as data (what a resumed sweep's progress display starts from).

`sweep status NAME --fix` closes what a driver that died (SIGKILL, a lost node) left RUNNING:
its MLflow runs become KILLED, its Optuna trials FAIL (a later `sweep resume` still finishes
them: search.py replaces a FAIL trial that completes). It refuses while the sweep's driver may
run: the driver writes `driver.json` (host, pid) in the sweep's folder when it starts and clears
the pid when it ends; a pid still alive on this machine, or any pid on another machine (which
cannot be checked from here), is taken as running.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from . import selection
from .credentials import redact
from .layout import OpenedSweep, SweepLayout, open_sweep
from .patience import optuna_storage
from .progress import cell_trials
from .spec import SweepSpec
from .store import Store
from .tracking import Tracker

DRIVER = "driver.json"  # who runs the sweep now: host, pid (None once it ended)


@dataclass(frozen=True)
class CellStatus:
    """One cell of a sweep as `sweep status` shows it."""

    cell: str
    done: int  # tuning trials that trained the whole budget
    stopped: int  # stopped early by ASHA (Optuna: PRUNED)
    running: int
    failed: int
    todo: int  # tuning trials not started yet
    repeats_finished: int  # seed repeats FINISHED (MLflow)
    repeats_failed: int
    candidates: list[selection.Candidate]  # the cell's finished tuning trials, for the rule
    best: selection.Ranked | None


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def cell_status(
    spec: SweepSpec, layout: SweepLayout, tracker: Tracker | Callable[[], Tracker] | None
) -> list[CellStatus]:
    """Every cell's counts and best, in the grid's order. `tracker` (or a function making it)
    is asked only when the sweep has seed repeats; a reader must not create a missing store."""
    studies = cell_trials(spec, layout, create=False)
    S = optuna.trial.TrialState
    obj = selection.rule(spec)
    repeats: dict[str, list[Any]] = {}
    if spec.repeats and tracker is not None:
        t = tracker() if callable(tracker) else tracker
        for r in t.sweep_runs(spec.name, "student", repeats=True):
            repeats.setdefault(r.data.tags.get("cell", ""), []).append(r)
    out = []
    for cell in spec.cells():
        trials = studies.get(cell.key, [])
        count = {st: sum(t.state == st for t in trials) for st in S}
        candidates = selection.from_optuna(trials, obj, spec.budget.epochs)
        # several objectives: a stopped trial is COMPLETE, with its values when it stopped
        early = sum(not c.full for c in candidates)
        runs = repeats.get(cell.key, [])
        out.append(
            CellStatus(
                cell=cell.key,
                done=count[S.COMPLETE] - early,
                stopped=count[S.PRUNED] + early,
                running=count[S.RUNNING],
                failed=count[S.FAIL],
                todo=spec.budget.trials_per_cell - len(trials),
                repeats_finished=sum(r.info.status == "FINISHED" for r in runs),
                repeats_failed=sum(r.info.status == "FAILED" for r in runs),
                candidates=candidates,
                best=selection.best(candidates, obj),
            )
        )
    return out


def status_table(
    spec: SweepSpec,
    layout: SweepLayout,
    tracker: Tracker | Callable[[], Tracker] | None,
    *,
    mlflow: str | None = None,
) -> str:
    """The best-per-cell table `sweep status` prints. `mlflow`: its last line (where the runs
    are), or none when None."""
    obj = selection.rule(spec)
    rep_col = f" {'repeats':>8}" if spec.repeats else ""
    lines = [
        f"sweep {spec.name}: objective {obj.describe()}",
        f"{'cell':<28} {'done':>5} {'stopped':>8} {'running':>8} {'failed':>7} {'todo':>5}"
        f"{rep_col}  best",
    ]
    for c in cell_status(spec, layout, tracker):
        best = c.best
        score = "/".join(f"{v:.4f}" for v in best.scores) if best else ""
        shown = f"{score} ({_params_text(best.first.ref.params)})" if best else ""
        rep = f" {f'{c.repeats_finished}/{spec.repeats}':>8}" if spec.repeats else ""
        lines.append(
            f"{c.cell:<28} {c.done:>5} {c.stopped:>8} {c.running:>8} {c.failed:>7} "
            f"{c.todo:>5}{rep}  {shown}"
        )
    if mlflow:
        lines.append(mlflow)
    return "\n".join(lines)


def require_optuna_file(layout: SweepLayout) -> None:
    """A sweep's SQLite Optuna file must be there: opening its URL would create an empty one,
    and the sweep would read as not started. FileNotFoundError naming it if it is gone."""
    url = layout.optuna_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(
            f"the sweep's Optuna storage {url.removeprefix('sqlite:///')} is gone (state.json "
            f"names it): it holds every tuning trial's outcome; restore it from a copy, or run "
            f"the sweep again under a new name (sweep run FILE --name NEW)"
        )


def sweep_status(name: str, storage: str | Path = "./sweeps", *, fix: bool = False) -> str:
    """The status table; `fix`: first close the stale RUNNING records (close_stale)."""
    opened = open_sweep(name, storage)
    spec, state = opened.spec, opened.state
    require_optuna_file(opened.layout)
    fixed = []
    if fix:
        runs, trials = close_stale(opened)
        fixed.append(
            f"closed {len(runs)} stale MLflow runs (KILLED) and {len(trials)} Optuna trials "
            f"(FAIL) left RUNNING by a driver that is gone; `sweep resume {name}` still "
            "finishes them"
        )

    def tracker() -> Tracker:
        return Tracker.of_state(state)

    mlflow = f"MLflow: {redact(state['mlflow_tracking_uri'])} experiment {state['experiment']}"
    return "\n".join([*fixed, status_table(spec, opened.layout, tracker, mlflow=mlflow)])


class SweepRunning(Exception):
    """The sweep's driver may still run: its records are live, not stale."""


def driver_started(store: Store) -> None:
    """Record this process as the sweep's driver (driver.json)."""
    mark = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    store.write(json.dumps(mark).encode(), DRIVER)


def driver_ended(store: Store) -> None:
    """The driver ends (finished or interrupted): nothing of the sweep runs any more."""
    mark = {"host": socket.gethostname(), "pid": None, "ended": time.time()}
    store.write(json.dumps(mark).encode(), DRIVER)


def running_driver(store: Store) -> str | None:
    """The driver that may still run the sweep, in words; None when none does."""
    raw = store.read(DRIVER)
    try:
        mark = json.loads(raw) if raw else {}
    except ValueError:  # a driver killed mid-write (Store.write is atomic, so: another writer)
        return f"unknown ({store.location(DRIVER)} is unreadable)"
    pid, host = mark.get("pid"), mark.get("host")
    if not pid:
        return None
    if host != socket.gethostname():
        return f"pid {pid} on {host} (it cannot be checked from here)"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"pid {pid} on this machine"


def close_stale(opened: OpenedSweep, *, optuna_too: bool = True) -> tuple[list[str], list[str]]:
    """Close what a dead driver left RUNNING: the sweep's MLflow runs (KILLED) and, with
    `optuna_too`, its Optuna trials (FAIL, user attr `closed_because`). Only this sweep's (its
    id). Returns (run ids, `cell#number` of trials); SweepRunning if its driver may run."""
    store, spec = opened.layout.store(), opened.spec
    who = running_driver(store)
    if who is not None:
        raise SweepRunning(
            f"sweep {spec.name!r} may still be running (driver {who}); stop it first. If it "
            f"is not running, delete {store.location(DRIVER)} and try again"
        )
    reason = "driver gone"
    runs = Tracker.of_state(opened.state).close_running(spec.name, "KILLED", reason, parent=True)
    trials: list[str] = []
    if not optuna_too:
        return runs, trials
    storage = optuna_storage(opened.layout.optuna_url, create=False)
    for cell, found in cell_trials(spec, opened.layout, create=False).items():
        stale = [t for t in found if t.state == optuna.trial.TrialState.RUNNING]
        if not stale:
            continue
        name = opened.layout.study_name(cell)
        study = optuna.load_study(study_name=name, storage=storage)
        study_id = storage.get_study_id_from_name(name)
        for t in stale:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "closed_because", reason)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            trials.append(f"{cell}#{t.number}")
    return runs, trials
