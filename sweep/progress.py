"""How far a sweep is: trials ended of trials planned, read from where each trial's end is
recorded. Tuning trials end in Optuna (the searcher tells every end: complete, pruned, failed);
seed repeats are not Optuna trials, so theirs is the MLflow run's end (finished or failed).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import optuna

from . import selection
from .layout import SweepLayout
from .patience import optuna_storage
from .spec import SweepSpec
from .tracking import Tracker


def cell_trials(
    spec: SweepSpec, layout: SweepLayout, *, create: bool = True
) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """Each cell's Optuna trials, for the cells whose study exists. `create=False`: a SQLite
    file that does not exist is not created (a reader must not)."""
    url = layout.optuna_url
    if not create and url.startswith("sqlite:///") and not _exists(url):
        return {}
    storage = optuna_storage(url, create=create)
    names = set(optuna.get_all_study_names(storage))
    out = {}
    for cell in spec.cells():
        name = layout.study_name(cell.key)
        if name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            out[cell.key] = current_trials(study.get_trials(deepcopy=False))
    return out


REPLACES = "replaces"  # user attr of a trial added in place of a FAIL one (search.py)


def current_trials(
    trials: Iterable[optuna.trial.FrozenTrial],
) -> list[optuna.trial.FrozenTrial]:
    """A cell's trials as they stand: a FAIL trial that was resumed and then finished (FAIL is
    final in Optuna, so the searcher added its outcome as a new trial, user attr `replaces`)
    is that new trial, under the old number, which is the trial's identity (checkpoints,
    MLflow run, seed); the copy is not listed again."""
    trials = list(trials)
    by = {t.user_attrs[REPLACES]: t for t in trials if REPLACES in t.user_attrs}
    out = []
    for t in trials:
        if REPLACES in t.user_attrs:
            continue
        if t.number in by and t.state == optuna.trial.TrialState.FAIL:
            new = copy.copy(by[t.number])
            new.number = t.number
            t = new
        out.append(t)
    return out


def _exists(sqlite_url: str) -> bool:
    return Path(sqlite_url[len("sqlite:///") :]).exists()


def sweep_progress(spec: SweepSpec, layout: SweepLayout, tracker: Tracker) -> tuple[int, int]:
    """(trials ended, trials planned)."""
    studies = cell_trials(spec, layout)
    obj = selection.rule(spec)
    ended = sum(t.state.is_finished() for trials in studies.values() for t in trials)
    planned = spec.tuning_trials()
    if spec.repeats:
        with_best = sum(bool(selection.from_optuna(t, obj)) for t in studies.values())
        planned += spec.repeats * with_best
        runs = tracker.sweep_runs(spec.name, "student", repeats=True)
        ended += sum(r.info.status in ("FINISHED", "FAILED") for r in runs)
    return ended, planned
