"""`sweep status NAME`: per cell, trials done / running / failed and the best value so far.

Read from the Optuna storage, the one place the searcher records every tuning trial's fate, and
for seed repeats from MLflow (through the tracker). The best is chosen by selection.py's rule.
`status_table` builds the same table from a sweep already open (the end of `sweep run`), and
`cell_status` gives its rows as data (what a resumed sweep's progress display starts from).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from . import selection
from .credentials import redact
from .layout import SweepLayout, open_sweep
from .progress import cell_trials
from .spec import SweepSpec
from .tracking import Tracker


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


def sweep_status(name: str, storage: str | Path = "./sweeps") -> str:
    opened = open_sweep(name, storage)
    spec, state = opened.spec, opened.state
    require_optuna_file(opened.layout)

    def tracker() -> Tracker:
        return Tracker(state["mlflow_tracking_uri"], state["experiment"])

    mlflow = f"MLflow: {redact(state['mlflow_tracking_uri'])} experiment {state['experiment']}"
    return status_table(spec, opened.layout, tracker, mlflow=mlflow)
