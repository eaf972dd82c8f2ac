"""Paired teacher-loss gains: is a teacher trained with loss L (mse, mcmi, ...) better than a
`ce` teacher, for each method and training attack, by how much, and how sure are we?

Why paired: two cells that differ only in the teacher loss run the same seeds, and in two
places the same hyperparameters, so the difference of two such runs isolates the teacher. Two
bases, each a mean of paired differences L − ce (in percentage points) with a bootstrap 95% CI
(stats.py):

- `seeds`: each cell's best configuration re-run with new seeds; repeat k has the same seed
  in every cell (`spec.repeat_seed(k)` depends only on the sweep), so repeat k of L pairs with
  repeat k of ce. It estimates the gain at each cell's tuned optimum, over seeds.
- `trials`: tuning trials with the same Optuna trial number in both cells that ran identical
  searched hyperparameters and the full budget. Each cell's first trial is the method's paper
  setting and, in the sampler's random phase, trial k draws the same values in every cell that
  differs only in the teacher loss; the parameters are compared, not trusted from the trial
  number (once the sampler models its own cell's results, the cells diverge). It estimates the
  gain averaged over those configurations.

Only FINISHED runs count; a trial ASHA stopped early is not comparable and is not paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from ..space import is_searched
from ..spec import Cell, SweepSpec
from .footnotes import NO_TEACHER, Footnotes
from .plots import _save
from .stats import MIN_PAIRS, Interval, paired_bootstrap
from .table import Best, reported_metrics

REFERENCE_TEACHER = "ce"
BASES = ("seeds", "trials")
COLUMNS = ["method", "train_attack", "teacher_loss", "metric", "basis", "n", "mean", "low", "high"]


@dataclass(frozen=True)
class Comparison:
    """A teacher loss's cell and the `ce` cell with the same method and training attack."""

    cell: Cell
    ref: Cell


def comparisons(spec: SweepSpec) -> list[Comparison]:
    """Every cell with a teacher loss other than `ce` that has a `ce` cell to compare with,
    in grid order."""
    cells = spec.cells()
    refs = {(c.method, c.train_attack): c for c in cells if c.teacher_loss == REFERENCE_TEACHER}
    return [
        Comparison(c, refs[(c.method, c.train_attack)])
        for c in cells
        if c.teacher_loss not in (NO_TEACHER, REFERENCE_TEACHER)
        and (c.method, c.train_attack) in refs
    ]


def unreferenced(spec: SweepSpec) -> list[Cell]:
    """Cells with a teacher loss other than `ce` and no `ce` cell beside them: not compared."""
    compared = {c.cell for c in comparisons(spec)}
    return [
        c
        for c in spec.cells()
        if c.teacher_loss not in (NO_TEACHER, REFERENCE_TEACHER) and c not in compared
    ]


# --- pairs --------------------------------------------------------------------------------------
def _finished(df: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    return df[(df["cell"] == cell.key) & (df["status"] == "FINISHED")]


def seed_repeats(df: pd.DataFrame, best: dict[str, Best], cell: Cell) -> pd.DataFrame:
    """The FINISHED seed repeats (repeat >= 1) of the cell's best configuration, one per k
    (the latest if a repeat was run twice)."""
    b = best.get(cell.key)
    if b is None:
        return df.iloc[0:0]
    rows = _finished(df, cell)
    rows = rows[(rows["config"] == b.config) & (rows["repeat"].fillna(0) >= 1)]
    return rows.drop_duplicates("repeat", keep="last")


def seed_pairs(df: pd.DataFrame, best: dict[str, Best], comp: Comparison) -> pd.DataFrame:
    """Repeat k of L's best configuration beside repeat k of ce's (columns suffixed `_l` and
    `_ref`); a pair whose logged seeds differ (a spec changed between runs) is dropped."""
    pairs = seed_repeats(df, best, comp.cell).merge(
        seed_repeats(df, best, comp.ref), on="repeat", suffixes=("_l", "_ref")
    )
    return pairs[_same_seed(pairs)]


def _same_seed(pairs: pd.DataFrame) -> np.ndarray:
    """Per pair: the logged seeds agree (an unlogged one is trusted to follow the index)."""
    a, b = pairs["seed_l"], pairs["seed_ref"]
    return ((a == b).fillna(False) | a.isna() | b.isna()).to_numpy(dtype=bool)


def searched_params(spec: SweepSpec, method: str) -> list[str]:
    """The table columns of the hyperparameters the method's cells search."""
    return [f"param.{k}" for k, v in spec.cell_space(method).items() if is_searched(v)]


def full_trials(spec: SweepSpec, df: pd.DataFrame, cell: Cell) -> pd.DataFrame:
    """The cell's FINISHED tuning trials (not repeats) that trained the full budget."""
    rows = _finished(df, cell)
    trained = rows["epochs_trained"]
    rows = rows[
        (rows["repeat"].fillna(0) == 0)
        & rows["optuna_trial"].notna()
        & trained.notna()
        & (trained.fillna(0) >= spec.budget.epochs)
    ]
    return rows.drop_duplicates("optuna_trial", keep="last")


def trial_pairs(spec: SweepSpec, df: pd.DataFrame, comp: Comparison) -> pd.DataFrame:
    """Tuning trial k of L beside trial k of ce when both trained the full budget, with the
    same seed, and every searched hyperparameter is identical (both absent counts as identical: a parameter that
    only exists under a choice); none when a searched parameter was never logged at all, as
    then equality cannot be checked."""
    params = searched_params(spec, comp.cell.method)
    pairs = full_trials(spec, df, comp.cell).merge(
        full_trials(spec, df, comp.ref), on="optuna_trial", suffixes=("_l", "_ref")
    )
    if any(p not in df for p in params):
        return pairs.iloc[0:0]
    same = _same_seed(pairs)  # trial k's seed is the sweep's seed + k in every cell
    for p in params:
        a, b = pairs[f"{p}_l"], pairs[f"{p}_ref"]
        same &= ((a == b).fillna(False) | (a.isna() & b.isna())).to_numpy(dtype=bool)
    return pairs[same]


def differences(pairs: pd.DataFrame, metric: str) -> np.ndarray:
    """L − ce per pair, in percentage points; pairs missing the metric on either side dropped."""
    d = pairs[f"{metric}_l"] - pairs[f"{metric}_ref"]
    return 100 * d.dropna().to_numpy(dtype=float)


# --- the table ----------------------------------------------------------------------------------
def teacher_gains(
    spec: SweepSpec,
    df: pd.DataFrame,
    best: dict[str, Best],
    *,
    n_boot: int = 10000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per comparison x metric x basis (COLUMNS), mean/low/high in percentage points;
    n = 0 rows are kept (mean NaN) so the report can say what has no pairs."""
    metrics = [m for m in reported_metrics(spec, df) if m in df]
    rows = []
    for comp in comparisons(spec):
        pairs = {"seeds": seed_pairs(df, best, comp), "trials": trial_pairs(spec, df, comp)}
        for metric in metrics:
            for basis in BASES:
                d = differences(pairs[basis], metric)
                ci = paired_bootstrap(d, n_boot=n_boot, level=level, seed=seed)
                c = comp.cell
                rows.append(
                    [c.method, c.train_attack, c.teacher_loss, metric, basis]
                    + [ci.n, ci.mean, ci.low, ci.high]
                )
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.astype({"n": int, "mean": float, "low": float, "high": float})


def write_gains(gains: pd.DataFrame, out: Path) -> Path:
    """`gains.csv`: the table as computed (percentage points)."""
    path = out / "gains.csv"
    gains.to_csv(path, index=False)
    return path


def interval(row: pd.Series) -> Interval:
    """A gains row back as an Interval."""
    return Interval(int(row["n"]), float(row["mean"]), float(row["low"]), float(row["high"]))


def lookup(gains: pd.DataFrame, cell: Cell, metric: str, basis: str) -> Interval:
    """The gains row of a cell (L), metric and basis; n = 0 when it has none."""
    hit = gains[
        (gains["method"] == cell.method)
        & (gains["train_attack"] == cell.train_attack)
        & (gains["teacher_loss"] == cell.teacher_loss)
        & (gains["metric"] == metric)
        & (gains["basis"] == basis)
    ]
    return interval(hit.iloc[0]) if len(hit) else Interval(0, math.nan, math.nan, math.nan)


def most_pairs(gains: pd.DataFrame, cell: Cell, basis: str) -> int:
    """Pairs of a comparison on a basis, over its metrics (a metric some runs lack has fewer)."""
    hit = gains[
        (gains["method"] == cell.method)
        & (gains["train_attack"] == cell.train_attack)
        & (gains["teacher_loss"] == cell.teacher_loss)
        & (gains["basis"] == basis)
    ]
    return int(hit["n"].max()) if len(hit) else 0


# --- what a conclusion still needs ----------------------------------------------------------------
def gain_gaps(
    spec: SweepSpec, df: pd.DataFrame, best: dict[str, Best], gains: pd.DataFrame
) -> list[str]:
    """What keeps each teacher-loss comparison from a conclusion (a CI on the seeds basis):
    cells with no `ce` cell, cells without a finished trial, and too few seed pairs, with
    each cell's finished repeats against `repeats` and what to change."""
    out = []
    lone = unreferenced(spec)
    if lone:
        out.append(
            f"no `{REFERENCE_TEACHER}` teacher cell to compare with (add `{REFERENCE_TEACHER}` "
            "to grid.teacher_loss): " + ", ".join(f"`{c.key}`" for c in lone) + "."
        )
    for comp in comparisons(spec):
        seeds = most_pairs(gains, comp.cell, "seeds")
        if seeds >= MIN_PAIRS:
            continue
        trials = most_pairs(gains, comp.cell, "trials")
        head = f"`{comp.cell.key}` vs `{comp.ref.key}`: {seeds} seed pair{'s' * (seeds != 1)}"
        tail = f"; the trials basis has {trials} pair{'s' * (trials != 1)}" + (
            "" if trials >= MIN_PAIRS else " (no CI either)"
        )
        unfinished = [c.key for c in (comp.cell, comp.ref) if c.key not in best]
        if unfinished:
            have = " has" if len(unfinished) == 1 else " have"
            why = " and ".join(f"`{k}`" for k in unfinished) + have + " no finished trial yet"
        elif spec.repeats == 0:
            why = (
                f"the sweep runs no seed repeats (`repeats: 0`); set `repeats: {MIN_PAIRS}` or more"
            )
        else:
            got = ", ".join(
                f"`{c.key}` {len(seed_repeats(df, best, c))}" for c in (comp.cell, comp.ref)
            )
            why = f"finished seed repeats of the best configuration: {got} of `repeats: {spec.repeats}`"
            if spec.repeats < MIN_PAIRS:
                why += f"; set `repeats: {MIN_PAIRS}` or more"
            else:
                why += " (the others have not finished: see Missing)"
        out.append(f"{head} (a CI needs {MIN_PAIRS}): {why}{tail}.")
    return out


# --- heatmap ------------------------------------------------------------------------------------
def heatmap_choice(gains: pd.DataFrame, cell: Cell, metric: str) -> tuple[str, Interval]:
    """The basis a heatmap entry shows: `seeds` when it has a CI, else `trials` when it has
    pairs, else whatever `seeds` has (possibly nothing)."""
    seeds = lookup(gains, cell, metric, "seeds")
    if seeds.n >= MIN_PAIRS:
        return "seeds", seeds
    trials = lookup(gains, cell, metric, "trials")
    return ("trials", trials) if trials.n else ("seeds", seeds)


def _ordered(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values))


def plot_gains(
    gains: pd.DataFrame,
    path: Path,
    metrics: Sequence[str] | None = None,
    notes: Footnotes | None = None,
) -> Path:
    """One figure: a row of panels per metric, a panel per training attack; in each, teacher
    loss (rows) x method (columns), coloured by the mean gain over `ce` in percentage points
    on a diverging map centred at 0 (symmetric per metric), annotated with the mean, `*` where
    the 95% CI excludes 0, and the basis and pairs (`s3`: seeds, 3 pairs; `t8`: trials).
    With `notes`, names carry the tables' † marks."""
    metrics = list(metrics) if metrics is not None else _ordered(gains["metric"])
    attacks, methods = _ordered(gains["train_attack"]), _ordered(gains["method"])
    losses = _ordered(gains["teacher_loss"])
    if not (metrics and attacks):
        fig = Figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no teacher-loss comparison in this sweep", ha="center", va="center")
        return _save(fig, path)
    fig = Figure(
        figsize=(  # wide enough for the title, whatever the grid
            max(7.5, len(attacks) * (1.1 * len(methods) + 1.8)),
            len(metrics) * (0.6 * len(losses) + 1.4) + 0.6,
        ),
        layout="constrained",
    )
    axes = fig.subplots(len(metrics), len(attacks), squeeze=False)
    cmap = _cmap()
    for i, metric in enumerate(metrics):
        grids = [_panel(gains, metric, attack, methods, losses) for attack in attacks]
        means = np.array([[[iv.mean for _, iv in row] for row in g] for g in grids], dtype=float)
        span = float(np.nanmax(np.abs(means))) if np.isfinite(means).any() else 0.0
        norm = Normalize(-(span or 1.0), span or 1.0)
        for j, (attack, grid) in enumerate(zip(attacks, grids, strict=True)):
            ax = axes[i][j]
            im = ax.imshow(np.ma.masked_invalid(means[j]), cmap=cmap, norm=norm, aspect="auto")
            for r, row in enumerate(grid):
                for c, (basis, iv) in enumerate(row):
                    _annotate(ax, r, c, basis, iv, norm)
            ax.set_xticks(range(len(methods)), [notes.method(m) if notes else m for m in methods])
            ax.set_yticks(range(len(losses)), [notes.teacher(t) if notes else t for t in losses])
            ax.tick_params(axis="x", labelrotation=30 if len(methods) > 3 else 0)
            ax.set_title(f"{metric.removeprefix('test/')}, train attack {attack}", fontsize=9)
        fig.colorbar(im, ax=list(axes[i]), label=f"gain over {REFERENCE_TEACHER} (pp)")
    fig.suptitle(
        f"Teacher loss vs {REFERENCE_TEACHER} teacher: mean paired gain (pp), * where the 95% CI "
        f"excludes 0\nbasis: seeds (s) where >= {MIN_PAIRS} seed pairs, else trials (t); "
        "the digits are the pairs",
        fontsize=10,
    )
    return _save(fig, path)


def _cmap() -> Colormap:
    return colormaps["RdBu"].with_extremes(bad="#dddddd")  # grey: no pairs


def _panel(
    gains: pd.DataFrame, metric: str, attack: str, methods: list[str], losses: list[str]
) -> list[list[tuple[str, Interval]]]:
    """[teacher loss][method] -> (basis, interval) of one metric and training attack."""
    return [
        [heatmap_choice(gains, Cell(loss, m, attack), metric) for m in methods] for loss in losses
    ]


def _annotate(ax: Axes, r: int, c: int, basis: str, iv: Interval, norm: Normalize) -> None:
    """The mean (bold with `*` when its CI excludes 0), then basis initial and pairs."""
    if iv.n == 0:
        ax.text(c, r, "—", ha="center", va="center", fontsize=8, color="#555555")
        return
    star = "*" if iv.excludes_zero else ""
    dark = abs(norm(iv.mean) - 0.5) > 0.3  # white text on the saturated ends
    ax.text(
        c,
        r,
        f"{iv.mean:+.2f}{star}\n{basis[0]}{iv.n}",
        ha="center",
        va="center",
        fontsize=8,
        fontweight="bold" if star else "normal",
        color="white" if dark else "black",
    )
