"""The sweep as the report reads it: its spec, its MLflow runs (one paged query, split by kind
in memory) and each cell's Optuna study; read-only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..layout import open_sweep
from ..progress import cell_trials
from ..spec import SweepSpec
from ..tracking import Tracker


@dataclass
class SweepData:
    """Everything the report is made from, read once."""

    name: str
    spec: SweepSpec
    state: dict[str, Any]
    tracker: Tracker
    students: list[Any]
    teachers: list[Any]
    refits: list[Any] = field(default_factory=list)  # kind refit: bests retrained on train+val
    studies: dict[str, list[optuna.trial.FrozenTrial]] = field(default_factory=dict)
    report_dir: Path | None = None  # where the report goes unless told (layout.py)


def read_sweep(name: str, storage: str | Path) -> SweepData:
    """The sweep's spec, its MLflow runs (one paged query, split by kind in memory) and its
    Optuna studies; FileNotFoundError if there is no such sweep."""
    opened = open_sweep(name, storage)
    state, spec = opened.state, opened.spec
    tracker = Tracker.of_state(state)
    runs = tracker.sweep_runs(name)
    return SweepData(
        name=name,
        spec=spec,
        state=state,
        tracker=tracker,
        students=[r for r in runs if r.data.tags.get("kind") == "student"],
        teachers=[r for r in runs if r.data.tags.get("kind") == "teacher"],
        refits=[r for r in runs if r.data.tags.get("kind") == "refit"],
        studies=cell_trials(spec, opened.layout, create=False),
        report_dir=opened.layout.report,
    )
