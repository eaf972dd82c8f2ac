"""`sweep status NAME`: per cell, trials done / running / failed and the best value so far.

Read from the Optuna storage, the one place the searcher records every tuning trial's fate, and
for seed repeats from MLflow (through the tracker). The best is chosen by selection.py's rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from . import selection
from .layout import open_sweep
from .progress import cell_trials
from .tracking import Tracker


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def sweep_status(name: str, storage: str | Path = "./sweeps") -> str:
    opened = open_sweep(name, storage)
    spec, state = opened.spec, opened.state
    studies = cell_trials(spec, opened.layout, create=False)
    S = optuna.trial.TrialState
    obj = selection.objective(spec)
    repeats: dict[str, list[Any]] = {}
    if spec.repeats:
        tracker = Tracker(state["mlflow_tracking_uri"], state["experiment"])
        for r in tracker.sweep_runs(name, "student", repeats=True):
            repeats.setdefault(r.data.tags.get("cell", ""), []).append(r)
    rep_col = f" {'repeats':>8}" if spec.repeats else ""
    lines = [
        f"sweep {name}: objective {obj.mode} {obj.metric}",
        f"{'cell':<28} {'done':>5} {'stopped':>8} {'running':>8} {'failed':>7} {'todo':>5}"
        f"{rep_col}  best",
    ]
    for cell in spec.cells():
        trials = studies.get(cell.key, [])
        count = {st: sum(t.state == st for t in trials) for st in S}
        best = selection.best(selection.from_optuna(trials, obj), obj)
        shown = f"{best.score:.4f} ({_params_text(best.first.ref.params)})" if best else ""
        todo = spec.budget.trials_per_cell - len(trials)
        rep = ""
        if spec.repeats:  # finished of planned
            ok = sum(r.info.status == "FINISHED" for r in repeats.get(cell.key, []))
            rep = f" {f'{ok}/{spec.repeats}':>8}"
        lines.append(
            f"{cell.key:<28} {count[S.COMPLETE]:>5} {count[S.PRUNED]:>8} "
            f"{count[S.RUNNING]:>8} {count[S.FAIL]:>7} {todo:>5}{rep}  {shown}"
        )
    lines.append(f"MLflow: {state['mlflow_tracking_uri']} experiment {state['experiment']}")
    return "\n".join(lines)
