"""Which Optuna sampler a cell's study uses, sized to the cell's budget, and the paired draws.

Why this is not Optuna's defaults: a cell has a handful of trials (3 to 8 in the shipped
files), and TPE's default `n_startup_trials=10` would leave every one of them a random draw.
Here the sampler models after `startup(spec)` trials (a third of the budget), TPE counts
running trials as bad (`constant_liar`) when trials of a cell may run together, and several
objectives get multi-objective TPE (or GP) instead of NSGA-II, whose population of 50 a cell
never fills.

Paired draws: during the random phase (trial number < startup) a trial's hyperparameters are
a function of (sweep seed, method, training attack, trial number, parameter name) only, not of
the cell's teacher loss, the order trials were asked in, or a resume. Cells that differ only in
teacher loss therefore run the same configurations in that phase, so their difference measures
the teacher (the report's paired gains). `optuna.paired: false` adds the teacher loss to that
key: draws stay reproducible, no longer shared.
"""

from __future__ import annotations

import hashlib
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from .spec import Cell, SweepSpec

# bench/tuning_quality.py (README, Tuning), regret relative to random search, median of 40
# (seed, cell) pairs: at 16 trials a cell GP 0.31x, TPE 0.62x; at 8 trials neither beats random
# (GP 1.02-1.11x, TPE 1.13-1.14x), though TPE leads after 4 (0.87-0.89x, GP 0.94-0.98x)
GP_FROM_TRIALS = 16


def sampler_kind(spec: SweepSpec) -> str:
    """The sampler the sweep's cells use: `optuna.sampler`; auto = GP with one objective and
    at least GP_FROM_TRIALS trials a cell (where the bench measured it winning), else TPE
    (several objectives were not benchmarked: multi-objective TPE)."""
    kind = spec.optuna.sampler
    if kind != "auto":
        return kind
    one = len(spec.objectives) == 1
    return "gp" if one and spec.budget.trials_per_cell >= GP_FROM_TRIALS else "tpe"


def concurrent(spec: SweepSpec) -> bool:
    """Whether trials of one cell may run at once (then TPE lies about running ones)."""
    if spec.optuna.constant_liar is not None:
        return spec.optuna.constant_liar
    return spec.resources.max_concurrent_trials != 1


def startup(spec: SweepSpec) -> int:
    """Trials of a cell in the random phase (paired draws) before its sampler models:
    `optuna.n_startup_trials`, null = a third of the cell's trials (at least 1); every trial
    with random search. At most the cell's trials."""
    n = spec.budget.trials_per_cell
    if sampler_kind(spec) == "random":
        return n
    s = spec.optuna.n_startup_trials
    return min(n, max(1, n // 3) if s is None else s)


def draw_key(spec: SweepSpec, cell: Cell) -> str:
    """What a random-phase draw depends on besides the trial number and the parameter."""
    key = f"{spec.seed}/{cell.method}/{cell.train_attack}"
    return key if spec.optuna.paired else f"{key}/{cell.teacher_loss}"


def budget_warnings(spec: SweepSpec) -> list[str]:
    """What `sweep validate` says when the budget leaves the sampler nothing to model."""
    kind, n = sampler_kind(spec), spec.budget.trials_per_cell
    if kind == "random":
        return []
    if startup(spec) >= n:
        asked = spec.optuna.n_startup_trials
        return [
            f"optuna: {kind} models after {n if asked is None else asked} trials but a cell has "
            f"{n} (budget.trials_per_cell): every trial is a random draw; lower "
            "optuna.n_startup_trials or raise the budget"
        ]
    return []


def budget_notes(spec: SweepSpec) -> list[str]:
    """What the bench says about a budget this small (`sweep validate` prints it)."""
    kind, n = sampler_kind(spec), spec.budget.trials_per_cell
    if kind in ("random", "nsga2") or n >= GP_FROM_TRIALS or startup(spec) >= n:
        return []
    return [
        f"{n} trials a cell: in bench/tuning_quality.py no sampler beat random search below "
        f"~{GP_FROM_TRIALS} trials a cell (at 8: TPE 1.14x, GP 1.11x random's regret; at 16: "
        "GP 0.31x, TPE 0.62x); the modelled trials are a bet here, not a measured gain"
    ]


def describe(spec: SweepSpec) -> str:
    """One line for `sweep validate`: the sampler and how the budget is spent."""
    kind, n = sampler_kind(spec), spec.budget.trials_per_cell
    objectives = len(spec.objectives)
    parts = [f"sampler {kind}" + (" (multi-objective)" if objectives > 1 else "")]
    if kind == "random":
        parts.append(f"{n} random draws a cell")
    else:
        s = startup(spec)
        parts.append(f"{s} random then {n - s} modelled trials a cell")
        if kind == "tpe":
            parts.append("constant liar " + ("on" if concurrent(spec) else "off"))
    parts.append("paired draws across teacher losses" if spec.optuna.paired else "unpaired")
    if spec.optuna.warm_start and startup(spec) < n:  # offered after the random phase
        parts.append("warm start from sibling cells")
    return "tuning: " + ", ".join(parts)


def make_sampler(spec: SweepSpec, cell: Cell, position: int) -> BaseSampler:
    """The sampler of `cell` (at `position` in the grid: the modelling sampler's seed)."""
    seed = spec.seed * 1000 + position
    kind = sampler_kind(spec)
    n = startup(spec)
    inner: BaseSampler
    if kind == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    elif kind == "nsga2":
        inner = optuna.samplers.NSGAIISampler(seed=seed)
    elif kind == "gp":
        inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n)
    else:
        inner = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n, constant_liar=concurrent(spec)
        )
    return PairedStart(inner, n, draw_key(spec, cell))


def _seed(key: str, number: int, name: str) -> int:
    """A stable seed (not Python's salted hash) for one draw."""
    digest = hashlib.sha256(f"{key}/{number}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PairedStart(BaseSampler):
    """`inner` after the random phase; before it (trial number < `startup`), each parameter is
    drawn by Optuna's RandomSampler seeded by (`key`, trial number, parameter name)."""

    def __init__(self, inner: BaseSampler, startup: int, key: str) -> None:
        self.inner, self.startup, self.key = inner, startup, key

    def _random_phase(self, trial: FrozenTrial) -> bool:
        return trial.number < self.startup

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if self._random_phase(trial):
            return {}
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self._random_phase(trial):
            return {}
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if self._random_phase(trial):
            draw = optuna.samplers.RandomSampler(seed=_seed(self.key, trial.number, param_name))
            return draw.sample_independent(study, trial, param_name, param_distribution)
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: list[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
