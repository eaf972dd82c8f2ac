"""Which configuration of a cell is "best": one rule for repeats, status, report and evaluate.

The rule (DESIGN §3.3):
- by the sweep's first objective, a validation metric, never a test number;
- among trials that trained the whole budget (an early-stopped trial's value is from an earlier
  epoch, so not comparable), unless the cell has none;
- a configuration (a tuned trial and its seed repeats, see `repeats:`) is scored by the value of
  the trial the sweep tuned, the number the sweep itself chose on; its repeats only estimate the
  spread of the test numbers (re-ranking on repeat means would favour configurations that were
  never repeated, whose single lucky value keeps its winner's-curse bias). If only repeats of a
  configuration finished, their mean;
- ties: the configuration the sweep tried first (lowest Optuna number).

Callers turn what they read (Optuna trials, MLflow runs, report rows) into `Candidate`s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import optuna

from .spec import Objective, SweepSpec


@dataclass(frozen=True)
class Candidate:
    """One finished trial of a cell, as the rule sees it."""

    config: str  # the configuration it belongs to (config key, or the run id if it has none)
    number: int | None  # the Optuna number of the configuration's tuned trial
    repeat: int  # 0: the tuned trial; k: its k-th seed repeat
    value: float  # the objective's value
    full: bool  # trained the whole epoch budget
    ref: Any = None  # what it was made from (an Optuna trial, an MLflow run, a row)


@dataclass(frozen=True)
class Ranked:
    """A configuration and its score; `runs` best representative first (the tuned trial)."""

    config: str
    score: float
    runs: list[Candidate]

    @property
    def first(self) -> Candidate:
        return self.runs[0]


def objective(spec: SweepSpec) -> Objective:
    """The objective selection ranks by: the first of `objectives`."""
    return spec.objectives[0]


def rank(candidates: Iterable[Candidate], obj: Objective) -> list[Ranked]:
    """A cell's configurations, best first, by the rule above."""
    done = [c for c in candidates if c.value is not None and not math.isnan(c.value)]
    full = [c for c in done if c.full]
    done = full or done
    groups: dict[str, list[Candidate]] = {}
    for c in done:
        groups.setdefault(c.config, []).append(c)
    sign = -1 if obj.mode == "max" else 1
    out = []
    for config, runs in groups.items():
        runs = sorted(runs, key=lambda c: c.repeat)
        tuned = [c for c in runs if c.repeat == 0]
        scored = tuned or runs
        out.append(Ranked(config, sum(c.value for c in scored) / len(scored), runs))
    first = {
        r.config: min((c.number for c in r.runs if c.number is not None), default=1 << 30)
        for r in out
    }
    return sorted(out, key=lambda r: (sign * r.score, first[r.config]))


def best(candidates: Iterable[Candidate], obj: Objective) -> Ranked | None:
    """The cell's best configuration, or None when nothing finished."""
    ranked = rank(candidates, obj)
    return ranked[0] if ranked else None


def from_optuna(trials: Iterable[Any], obj: Objective) -> list[Candidate]:
    """A cell's Optuna trials that COMPLETEd (trained the whole budget: ASHA-stopped trials are
    PRUNED), each its own configuration."""
    return [
        Candidate(str(t.number), t.number, 0, float(t.values[0]), True, t)
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]


def _int(v: Any) -> int | None:
    try:
        return int(float(v)) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def from_runs(runs: Iterable[Any], obj: Objective, epochs: int) -> list[Candidate]:
    """A cell's FINISHED MLflow student runs that logged the objective."""
    out = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        if r.info.status != "FINISHED" or obj.metric not in metrics:
            continue
        trained = _int(tags.get("epochs_trained"))
        out.append(
            Candidate(
                config=tags.get("config_key") or r.info.run_id,
                number=_int(tags.get("optuna_trial")),
                repeat=_int(tags.get("repeat")) or 0,
                value=float(metrics[obj.metric]),
                full=trained is not None and trained >= epochs,
                ref=r,
            )
        )
    return out
