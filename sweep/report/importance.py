"""Which hyperparameters mattered, per method: fANOVA importances (Optuna's
`FanovaImportanceEvaluator`) of each cell's study, averaged over the method's cells.

Why per cell, then averaged: the cells of a method differ by teacher loss and training attack,
which shift the objective's level far more than any hyperparameter does. One forest over all of
a method's trials would fit those shifts, and since every cell's trials cover the same ranges, the
hyperparameters would get whatever variance the shifts leave over; each cell's own study holds
its cell fixed, so its importances are about the hyperparameters alone.

Which trials: a cell's COMPLETE trials that trained the whole epoch budget (a trial stopped early
by ASHA but told COMPLETE carries `epochs_trained` < budget; its values are from an earlier
epoch, so not comparable), at least `MIN_TRIALS` of them with at least one searched
hyperparameter taking two values. Hyperparameters the file fixes are not in a trial's params,
so they never appear.

How rough: on synthetic 8-trial studies (40 seeds each) a hyperparameter the objective ignores
got a median 0.09 of the importance with a noiseless objective and 0.18 with noise of about
half the real effect's spread, at worst 0.4 and 0.7; the one that mattered ranked first in 40
and 38 of 40. Read the ranking and large gaps, over several cells, not the digits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from ..spec import SweepSpec
from .footnotes import Footnotes
from .plots import plot_importances

# fANOVA fits a random forest to the trials. With 3 trials a tree makes at most 2 splits, so
# whichever parameters the bootstrap happens to split on take all the importance; 4 is the
# least that lets two parameters and their interaction be told apart at all (a floor, not a
# guarantee: the section prints how many cells each mean is over).
MIN_TRIALS = 4
SEED = 0  # the evaluator's forest seed: the same trials give the same importances
COLUMNS = ["method", "objective", "param", "importance", "importance_std", "n_cells"]


@dataclass(frozen=True)
class CellImportance:
    """One cell's importances: objective metric -> hyperparameter -> share (sums to 1)."""

    cell: str
    method: str
    trials: int  # the trials they were computed from
    by_objective: dict[str, dict[str, float]]


@dataclass
class Importances:
    """A sweep's importances: per cell, per method (`table`, the CSV's rows) and what was
    skipped, as (cell, why) in grid order."""

    cells: list[CellImportance] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))
    skipped: list[tuple[str, str]] = field(default_factory=list)


def usable_trials(
    spec: SweepSpec, trials: list[optuna.trial.FrozenTrial]
) -> list[optuna.trial.FrozenTrial]:
    """The trials importances are computed from: COMPLETE, one finite value per objective,
    trained the whole budget (no `epochs_trained` user attr: told COMPLETE only at full budget)."""
    budget, n_obj = spec.budget.epochs, len(spec.objectives)
    return [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.values is not None
        and len(t.values) == n_obj
        and all(math.isfinite(v) for v in t.values)
        and t.user_attrs.get("epochs_trained", budget) >= budget
    ]


def varying_params(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """Searched hyperparameters of every one of `trials` that take at least two values over
    them, sorted (Optuna's evaluators, too, look only at the parameters all trials have)."""
    if not trials:
        return []
    common = set.intersection(*(set(t.params) for t in trials))
    return sorted(k for k in common if len({t.params[k] for t in trials}) > 1)


def _study(spec: SweepSpec, trials: list[optuna.trial.FrozenTrial]) -> optuna.Study:
    """An in-memory study holding `trials`, without Optuna's 'new study created' log line."""
    directions = ["maximize" if o.mode == "max" else "minimize" for o in spec.objectives]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(trials)
    return study


def cell_importance(
    spec: SweepSpec, cell: str, method: str, trials: list[optuna.trial.FrozenTrial]
) -> tuple[CellImportance | None, list[str]]:
    """(importances, why-nots) of one cell's study. None with the reason when the cell has too
    few usable trials or nothing varies; an objective whose value is the same in every trial has
    no variance to share out (fANOVA refuses it): left out of `by_objective`, with a reason."""
    used = usable_trials(spec, trials)
    if len(used) < MIN_TRIALS:
        return None, [f"{len(used)} completed full-budget trials (needs {MIN_TRIALS})"]
    if not varying_params(used):
        searched = sorted({k for t in used for k in t.params})
        why = "no searched hyperparameter" if not searched else "no searched hyperparameter varies"
        return None, [f"{why} over its {len(used)} trials"]
    study = _study(spec, used)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=SEED)
    out: dict[str, dict[str, float]] = {}
    why: list[str] = []
    for i, obj in enumerate(spec.objectives):
        if len({t.values[i] for t in used}) < 2:
            why.append(f"`{obj.metric}` is the same in all {len(used)} trials")
            continue
        try:
            got = optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=lambda t, i=i: t.values[i]
            )
        except RuntimeError as e:  # fANOVA: no tree could split (no variance to share out)
            why.append(f"`{obj.metric}`: fANOVA failed ({e})")
            continue
        out[obj.metric] = {k: float(v) for k, v in got.items()}
    return (CellImportance(cell, method, len(used), out) if out else None), why


def method_table(spec: SweepSpec, cells: list[CellImportance]) -> pd.DataFrame:
    """Per method, objective and hyperparameter: the mean and sample std of its importance over
    the method's cells that have it, and how many (`n_cells`). Rows by method (grid order),
    objective (the file's order), then decreasing importance."""
    rows = []
    for m_rank, method in enumerate(spec.grid.method):
        for o_rank, obj in enumerate(spec.objectives):
            shares: dict[str, list[float]] = {}
            for c in cells:
                if c.method == method and obj.metric in c.by_objective:
                    for p, v in c.by_objective[obj.metric].items():
                        shares.setdefault(p, []).append(v)
            for p, vs in shares.items():
                std = float(np.std(vs, ddof=1)) if len(vs) > 1 else math.nan
                rows.append(
                    (m_rank, o_rank, method, obj.metric, p, float(np.mean(vs)), std, len(vs))
                )
    df = pd.DataFrame(rows, columns=["_m", "_o", *COLUMNS])
    df = df.sort_values(["_m", "_o", "importance", "param"], ascending=[True, True, False, True])
    return df.drop(columns=["_m", "_o"]).reset_index(drop=True)


def param_importances(
    spec: SweepSpec, studies: Mapping[str, list[optuna.trial.FrozenTrial]]
) -> Importances:
    """Every grid cell's importances (a cell without a study is skipped, and said so), and the
    per-method means."""
    imp = Importances()
    for cell in spec.cells():
        trials = studies.get(cell.key)
        if trials is None:
            imp.skipped.append((cell.key, "no Optuna study"))
            continue
        got, why = cell_importance(spec, cell.key, cell.method, trials)
        imp.skipped += [(cell.key, w) for w in why]
        if got is not None:
            imp.cells.append(got)
    imp.table = method_table(spec, imp.cells)
    return imp


def write_importances(
    spec: SweepSpec, imp: Importances, out: Path, notes: Footnotes | None = None
) -> list[Path]:
    """`importances.csv` (the per-method table, `COLUMNS`) and `importances.png` in `out`."""
    imp.table.to_csv(out / "importances.csv", index=False)
    png = plot_importances(spec, imp.table, out / "importances.png", notes)
    return [out / "importances.csv", png]


def _share(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}") + f" (n={n})"


def importance_section(
    spec: SweepSpec, imp: Importances, notes: Footnotes | None = None
) -> list[str]:
    """summary.md's "Hyperparameter importances": a table per method (rows hyperparameters by
    the first objective's importance, a column per objective) and the cells skipped, and why."""
    lines = [
        "## Hyperparameter importances",
        "",
        "fANOVA (Optuna's `FanovaImportanceEvaluator`, seed 0) on each cell's completed "
        f"full-budget trials (at least {MIN_TRIALS}), per objective; a cell's importances sum to "
        "1. Shown: the mean ± sample std over the method's cells (n), computed per cell so that "
        "the shifts between teacher losses and attacks do not count as importance. With ~8 "
        "trials a cell, a hyperparameter that does not matter typically still gets 0.1-0.2, "
        "sometimes far more: read the ranking and large gaps, not the digits. Table: `importances.csv`; plot: `importances.png`.",
        "",
    ]
    metrics = [o.metric for o in spec.objectives]
    for method in spec.grid.method:
        mine = imp.table[imp.table["method"] == method]
        name = notes.method(method) if notes else method
        if mine.empty:
            lines += [f"### {name}", "", "No cell with enough trials.", ""]
            continue
        order = list(dict.fromkeys(mine["param"]))  # first objective's ranking, then the rest
        cells = {(r.objective, r.param): r for r in mine.itertuples()}
        rows = []
        for p in order:
            row = [f"`{p}`"]
            for m in metrics:
                r = cells.get((m, p))
                row.append("—" if r is None else _share(r.importance, r.importance_std, r.n_cells))
            rows.append(row)
        header = ["hyperparameter"] + [f"`{m}`" for m in metrics]
        lines += [f"### {name}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if imp.skipped:
        said = "; ".join(f"`{cell}`: {why}" for cell, why in imp.skipped)
        lines += [f"Skipped: {said}.", ""]
    return lines
