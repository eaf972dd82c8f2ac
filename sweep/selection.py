"""Which configuration of a cell is "best": one rule for repeats, status, report and evaluate.

The rule (DESIGN §3.3):
- by the sweep's objective, a validation metric, never a test number; with several objectives,
  by the declared `choose:` rule on the cell's Pareto front (`Rule`: knee or constrained);
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

from .spec import ChooseSpec, Objective, SweepSpec


@dataclass(frozen=True)
class Candidate:
    """One finished trial of a cell, as the rule sees it."""

    config: str  # the configuration it belongs to (config key, or the run id if it has none)
    number: int | None  # the Optuna number of the configuration's tuned trial
    repeat: int  # 0: the tuned trial; k: its k-th seed repeat
    value: float | tuple[float, ...]  # the objective's value; one per objective if several
    full: bool  # trained the whole epoch budget
    ref: Any = None  # what it was made from (an Optuna trial, an MLflow run, a row)

    @property
    def values(self) -> tuple[float, ...]:
        return self.value if isinstance(self.value, tuple) else (self.value,)


@dataclass(frozen=True)
class Ranked:
    """A configuration and its score (one mean per objective); `runs` best representative
    first (the tuned trial)."""

    config: str
    scores: tuple[float, ...]
    runs: list[Candidate]

    @property
    def first(self) -> Candidate:
        return self.runs[0]

    @property
    def score(self) -> float:
        """The first objective's score (the only one with one objective)."""
        return self.scores[0]


@dataclass(frozen=True)
class Rule:
    """The objectives (validation metrics, each max or min) and, with several, the rule that
    picks from the Pareto front (spec.ChooseSpec)."""

    objectives: tuple[Objective, ...]
    choose: ChooseSpec | None = None

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    def describe(self) -> str:
        objs = ", ".join(f"{o.mode} {o.metric}" for o in self.objectives)
        c = self.choose
        if c is None:
            return objs
        if c.rule == "knee":
            return f"{objs}; from each cell's Pareto front, the knee (nearest the ideal point)"
        bounds = [f"{m} >= {v:g}" for m, v in c.at_least.items()]
        bounds += [f"{m} <= {v:g}" for m, v in c.at_most.items()]
        target = f"max {c.maximize}" if c.maximize else f"min {c.minimize}"
        return f"{objs}; from each cell's Pareto front, {target} with {' and '.join(bounds)}"

    def signed(self, scores: tuple[float, ...]) -> tuple[float, ...]:
        """Scores with every objective turned into one to maximise."""
        return tuple(
            v if o.mode == "max" else -v for o, v in zip(self.objectives, scores, strict=True)
        )


def rule(spec: SweepSpec) -> Rule:
    """The sweep's one rule: its objectives and, with several, its `choose:` (knee unless the
    file says otherwise)."""
    several = len(spec.objectives) > 1
    return Rule(tuple(spec.objectives), (spec.choose or ChooseSpec()) if several else None)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def front(ranked: list[Ranked], r: Rule) -> list[Ranked]:
    """The configurations no other configuration beats on every objective (Pareto front), in
    the given order."""
    s = {x.config: r.signed(x.scores) for x in ranked}
    return [x for x in ranked if not any(_dominates(s[y.config], s[x.config]) for y in ranked)]


def _order(groups: list[Ranked], r: Rule) -> list[Ranked]:
    """Best first by the rule; ties: the configuration tried first."""
    first = {
        g.config: min((c.number for c in g.runs if c.number is not None), default=1 << 30)
        for g in groups
    }
    signed = {g.config: r.signed(g.scores) for g in groups}
    c = r.choose
    if c is None:  # one objective: its value
        return sorted(groups, key=lambda g: (-signed[g.config][0], first[g.config]))
    index = {m: i for i, m in enumerate(r.metrics)}
    if c.rule == "constrained":
        target = index[c.maximize or c.minimize]

        def shortfall(g: Ranked) -> float:  # how far a configuration is from every bound
            out = sum(max(0.0, v - g.scores[index[m]]) for m, v in c.at_least.items())
            return out + sum(max(0.0, g.scores[index[m]] - v) for m, v in c.at_most.items())

        sign = 1 if c.maximize else -1
        return sorted(
            groups,
            key=lambda g: (shortfall(g), -sign * g.scores[target], first[g.config]),
        )
    # knee: each objective scaled to [0, 1] over the front (1 = the front's best), then the
    # distance to the ideal point (1, ..., 1); the front first, the rest after it
    on_front = {g.config for g in front(groups, r)}
    pts = [signed[g.config] for g in groups if g.config in on_front]
    lo = [min(p[i] for p in pts) for i in range(len(r.objectives))]
    hi = [max(p[i] for p in pts) for i in range(len(r.objectives))]

    def distance(g: Ranked) -> float:
        scaled = [
            1.0 if h == low else (v - low) / (h - low)
            for v, low, h in zip(signed[g.config], lo, hi, strict=True)
        ]
        return math.sqrt(sum((1.0 - x) ** 2 for x in scaled))

    return sorted(groups, key=lambda g: (g.config not in on_front, distance(g), first[g.config]))


def _as_rule(obj: Rule | Objective) -> Rule:
    return obj if isinstance(obj, Rule) else Rule((obj,))


def rank(candidates: Iterable[Candidate], obj: Rule | Objective) -> list[Ranked]:
    """A cell's configurations, best first, by the rule above (one Objective: by its value)."""
    obj = _as_rule(obj)
    done = [c for c in candidates if not any(math.isnan(v) for v in c.values)]
    full = [c for c in done if c.full]
    done = full or done
    groups: dict[str, list[Candidate]] = {}
    for c in done:
        groups.setdefault(c.config, []).append(c)
    out = []
    for config, runs in groups.items():
        runs = sorted(runs, key=lambda c: c.repeat)
        tuned = [c for c in runs if c.repeat == 0]
        scored = tuned or runs
        k = len(obj.objectives)
        scores = tuple(sum(c.values[i] for c in scored) / len(scored) for i in range(k))
        out.append(Ranked(config, scores, runs))
    return _order(out, obj)


def best(candidates: Iterable[Candidate], obj: Rule | Objective) -> Ranked | None:
    """The cell's best configuration, or None when nothing finished."""
    ranked = rank(candidates, obj)
    return ranked[0] if ranked else None


def from_optuna(
    trials: Iterable[Any], obj: Rule | Objective, epochs: int | None = None
) -> list[Candidate]:
    """A cell's Optuna trials that COMPLETEd, each its own configuration. With one objective an
    ASHA-stopped trial is PRUNED (not here); with several it is COMPLETE (so the sampler learns
    from it) with the epochs it trained as user attr `epochs_trained`, and is not `full`."""
    out = []
    for t in trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        trained = t.user_attrs.get("epochs_trained")
        full = epochs is None or trained is None or int(trained) >= epochs
        value = tuple(float(v) for v in t.values)
        out.append(Candidate(str(t.number), t.number, 0, _one(value), full, t))
    return out


def _one(values: tuple[float, ...]) -> float | tuple[float, ...]:
    return values[0] if len(values) == 1 else values


def _int(v: Any) -> int | None:
    try:
        return int(float(v)) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def from_runs(runs: Iterable[Any], obj: Rule | Objective, epochs: int) -> list[Candidate]:
    """A cell's FINISHED MLflow student runs that logged every objective."""
    obj = _as_rule(obj)
    out = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        if r.info.status != "FINISHED" or any(m not in metrics for m in obj.metrics):
            continue
        trained = _int(tags.get("epochs_trained"))
        out.append(
            Candidate(
                config=tags.get("config_key") or r.info.run_id,
                number=_int(tags.get("optuna_trial")),
                repeat=_int(tags.get("repeat")) or 0,
                value=_one(tuple(float(metrics[m]) for m in obj.metrics)),
                full=trained is not None and trained >= epochs,
                ref=r,
            )
        )
    return out
