"""The report's plots: clean vs robust accuracy (the cells' best configurations on one plot, and
each cell's trials with its own Pareto front), each cell's optimisation history, and the
hyperparameter importances. Drawn with matplotlib's Agg canvas, without pyplot's global state.

The robust axis is the worst case over the evaluation suite (`worst_case_robust`): the first
attack listed is often FGSM, the weakest, and a front drawn on it would reward gradient masking.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..spec import SweepSpec
from .footnotes import Footnotes
from .table import Best

COLUMNS = 5  # panels per row of the per-cell plot: 30 cells make a 6-row figure


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    fig.savefig(path, dpi=120)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (both maximised), by increasing x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def robust_metrics(spec: SweepSpec) -> list[str]:
    """The test robust accuracies of the evaluation suite, in the file's order."""
    return [f"test/robust_acc/{a.key}" for a in spec.evaluation.attacks]


def _has(values: Mapping[str, Any], metric: str) -> bool:
    return metric in values and not pd.isna(values[metric])


def worst_case_metric(values: Mapping[str, Any], spec: SweepSpec) -> str | None:
    """The suite's attack with the lowest robust accuracy among those `values` holds (a run's
    row, or a configuration's means); the first listed on a tie; None when it holds none.

    The one rule for the robust axis. A run that lacks some attack's metric (the suite was
    changed, a test evaluation failed half-way) is judged by the attacks it has: an upper bound
    on its worst case, which the plots say (`lacks_attacks`); dropping it would hide the run."""
    present = [
        (float(values[m]), i, m) for i, m in enumerate(robust_metrics(spec)) if _has(values, m)
    ]
    return min(present)[2] if present else None


def worst_case_robust(values: Mapping[str, Any], spec: SweepSpec) -> float:
    """The worst-case robust accuracy of `values` (see `worst_case_metric`); NaN if none."""
    metric = worst_case_metric(values, spec)
    return math.nan if metric is None else float(values[metric])


def lacks_attacks(values: Mapping[str, Any], spec: SweepSpec) -> list[str]:
    """The suite's robust metrics `values` does not have: its worst case is over the rest."""
    return [m for m in robust_metrics(spec) if not _has(values, m)]


def robust_label(spec: SweepSpec) -> str:
    keys = [a.key for a in spec.evaluation.attacks]
    if len(keys) == 1:
        return f"test robust accuracy, {keys[0]} (%)"
    return f"test robust accuracy, worst of {', '.join(keys)} (%)"


def _partial_note(fig: Figure, n: int, what: str) -> None:
    if n:
        fig.text(
            0.01,
            0.005,
            f"{n} {what} lack some attack's metric: their worst case is over the attacks they "
            "have (an upper bound)",
            fontsize=7,
            color="tab:gray",
        )


def plot_pareto(
    spec: SweepSpec, best: dict[str, Best], path: Path, notes: Footnotes | None = None
) -> Path:
    """One point per cell's best configuration, named by its cell; robust axis: the worst case
    of the configuration's mean accuracies over the suite (error bar: that attack's std). With
    `notes`, a cell whose method or teacher is not the paper's as published carries the mark."""
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    pts: dict[str, tuple[float, float, str]] = {}
    for k, b in best.items():
        metric = worst_case_metric(b.mean, spec)
        if metric is not None and not math.isnan(b.mean.get("test/clean_acc", math.nan)):
            pts[k] = (100 * b.mean["test/clean_acc"], 100 * b.mean[metric], metric)
    if pts:
        for cell, (x, y, metric) in pts.items():
            b = best[cell]
            ax.errorbar(
                x,
                y,
                xerr=None if math.isnan(b.std["test/clean_acc"]) else 100 * b.std["test/clean_acc"],
                yerr=None if math.isnan(b.std.get(metric, math.nan)) else 100 * b.std[metric],
                fmt="o",
                color="tab:blue",
                capsize=3,
            )
            name = notes.cell(cell) if notes else cell
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front([(x, y) for x, y, _ in pts.values()])
        ax.plot(  # ringed points and the staircase, so a one-point front still shows
            *zip(*front, strict=True),
            "-o",
            drawstyle="steps-pre",
            color="tab:red",
            mfc="none",
            ms=12,
            label="Pareto front",
        )
        ax.legend(loc="lower left")
        _partial_note(fig, sum(bool(lacks_attacks(best[k].mean, spec)) for k in pts), "cells")
    else:
        why = "no finished trial yet" if spec.evaluation.attacks else "evaluation.attacks is empty"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("test clean accuracy (%)")
    ax.set_ylabel(robust_label(spec))
    ax.set_title(f"{spec.name}: best configuration per cell")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class CellFront:
    """What one panel of `plot_cell_fronts` shows, in %: every full-budget tuned trial of the
    cell as (clean, worst-case robust, run id), its Pareto front, the best configuration's point
    (None when its tuned run is not among the points: it was chosen from short or repeat runs)
    and how many points lack some attack."""

    cell: str
    points: list[tuple[float, float, str]]
    front: list[tuple[float, float]]
    best: tuple[float, float] | None
    partial: int


def tuned_full_rows(spec: SweepSpec, df: pd.DataFrame) -> pd.DataFrame:
    """FINISHED tuned trials (not seed repeats) that trained the whole budget: the runs the
    sweep compared, each configuration once."""
    if df.empty:
        return df
    repeat = pd.to_numeric(df["repeat"], errors="coerce").fillna(0)
    epochs = pd.to_numeric(df["epochs_trained"], errors="coerce").fillna(-1)
    keep = (df["status"] == "FINISHED") & (repeat == 0) & (epochs >= spec.budget.epochs)
    return df[keep.astype(bool)]


def cell_front_points(
    spec: SweepSpec, df: pd.DataFrame, best: dict[str, Best]
) -> dict[str, CellFront]:
    """Per cell with at least one point, in grid order: its panel of `plot_cell_fronts`."""
    rows = tuned_full_rows(spec, df)
    out: dict[str, CellFront] = {}
    if rows.empty:
        return out
    for cell in spec.cells():
        points, partial = [], 0
        for _, r in rows[rows["cell"] == cell.key].iterrows():
            y = worst_case_robust(r, spec)
            if math.isnan(y) or not _has(r, "test/clean_acc"):
                continue
            points.append((100 * float(r["test/clean_acc"]), 100 * y, str(r["run_id"])))
            partial += bool(lacks_attacks(r, spec))
        if not points:
            continue
        b = best.get(cell.key)
        mine = [(x, y) for x, y, run in points if b is not None and run == b.run_id]
        front = pareto_front([(x, y) for x, y, _ in points])
        out[cell.key] = CellFront(cell.key, points, front, mine[0] if mine else None, partial)
    return out


def plot_cell_fronts(
    spec: SweepSpec,
    df: pd.DataFrame,
    best: dict[str, Best],
    path: Path,
    notes: Footnotes | None = None,
) -> Path:
    """Small multiples, one panel per cell (grid order, cells with a full-budget finished
    trial): its tuned trials' test clean vs worst-case robust accuracy, its Pareto front as a
    staircase, and its chosen best configuration (chosen on validation, so not necessarily on
    the test front) starred. Axes are per panel: cells trained without an attack sit near 0."""
    fronts = cell_front_points(spec, df, best)
    n = max(len(fronts), 1)
    cols = min(COLUMNS, n)
    rows = math.ceil(n / cols)
    width, height = 3.2 * cols + 0.6, 2.7 * rows + 0.9
    fig = Figure(figsize=(width, height))
    # fixed margins in inches, not tight_layout: it draws every panel once more (seconds at 30)
    margins = dict(left=0.75 / width, right=1 - 0.1 / width, bottom=0.65 / height)
    margins |= dict(top=1 - 0.6 / height, wspace=0.3, hspace=0.45)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=margins).ravel()
    for ax, f in zip(axes, fronts.values(), strict=False):
        xs, ys, _ = zip(*f.points, strict=True)
        ax.plot(xs, ys, "o", color="tab:blue", ms=4, alpha=0.7, label="trial")
        ax.plot(
            *zip(*f.front, strict=True),
            "-",
            drawstyle="steps-pre",
            color="tab:red",
            lw=1,
            label="Pareto front",
        )
        if f.best is not None:
            ax.plot(*f.best, "*", color="tab:orange", mec="black", ms=13, label="best (val)")
        ax.set_title(notes.cell(f.cell) if notes else f.cell, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    _spare_panels(axes, len(fronts), "no full-budget finished trial yet", legend=6)
    fig.supxlabel("test clean accuracy (%)", fontsize=9)
    fig.supylabel(robust_label(spec), fontsize=9)
    absent = [c.key for c in spec.cells() if c.key not in fronts]
    title = f"{spec.name}: tuned trials per cell (full budget)"
    if absent and fronts:
        title += f"; no such trial yet in {len(absent)} cells"
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    _partial_note(fig, sum(f.partial for f in fronts.values()), "trials")
    return _save(fig, path)


def _spare_panels(axes: Any, used: int, empty: str, *, legend: int) -> None:
    """Panels past the `used` ones off; the legend on the first, or `empty` said there."""
    for ax in axes[used:]:
        ax.set_axis_off()
    if used:
        axes[0].legend(fontsize=legend, loc="lower left")
        return
    axes[0].set_axis_on()
    axes[0].text(0.5, 0.5, empty, ha="center", va="center", transform=axes[0].transAxes)


def safe_name(cell: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", cell)


def plot_history(
    spec: SweepSpec, cell: str, trials: list[optuna.trial.FrozenTrial], path: Path
) -> Path:
    """Objective per Optuna trial number and the best-so-far line; pruned (ASHA-stopped) trials
    at their last reported value, hollow, as they do not count for the best."""
    obj = spec.objectives[0]
    S = optuna.trial.TrialState
    done = sorted((t.number, t.values[0]) for t in trials if t.state == S.COMPLETE and t.values)
    pruned = [
        (t.number, t.intermediate_values[max(t.intermediate_values)])
        for t in trials
        if t.state == S.PRUNED and t.intermediate_values
    ]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if done:
        xs, ys = zip(*done, strict=True)
        acc = np.maximum.accumulate if obj.mode == "max" else np.minimum.accumulate
        ax.plot(xs, ys, "o", color="tab:blue", label="trial")
        ax.plot(xs, acc(np.array(ys)), drawstyle="steps-post", color="tab:red", label="best so far")
    if pruned:
        px, py = zip(*pruned, strict=True)
        ax.plot(px, py, "o", mfc="none", color="tab:gray", label="stopped early")
    if done or pruned:
        ax.legend(loc="best")
    else:
        ax.text(
            0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel(obj.metric)
    ax.set_title(f"{cell}: {obj.mode} {obj.metric}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_importances(
    spec: SweepSpec, table: pd.DataFrame, path: Path, notes: Footnotes | None = None
) -> Path:
    """One panel per method with importances (importance.py's table): a horizontal bar per
    hyperparameter and objective, the mean over the method's cells, the std over them as an
    error bar; the panel title says over how many cells."""
    methods = [m for m in spec.grid.method if (table["method"] == m).any()]
    metrics = [o.metric for o in spec.objectives]
    n = max(len(methods), 1)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 0.6 + 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    height = 0.8 / len(metrics)
    for ax, method in zip(axes, methods, strict=False):
        mine = table[table["method"] == method]
        params = list(dict.fromkeys(mine["param"]))[::-1]  # the most important on top
        for j, metric in enumerate(metrics):
            got = mine[mine["objective"] == metric].set_index("param")
            ys = [i + (j - (len(metrics) - 1) / 2) * height for i in range(len(params))]
            means = [got["importance"].get(p, math.nan) for p in params]
            errs = [got["importance_std"].get(p, math.nan) for p in params]
            ax.barh(ys, means, height, xerr=np.nan_to_num(errs), capsize=2, label=metric)
        ax.set_yticks(range(len(params)), params, fontsize=8)
        ax.set_xlim(0, 1)
        cells = sorted(set(mine["n_cells"]))
        span = f"{cells[0]}" if len(cells) == 1 else f"{cells[0]}-{cells[-1]}"
        name = notes.method(method) if notes else method
        ax.set_title(f"{name} ({span} cells)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    _spare_panels(axes, len(methods), "no cell with enough completed trials", legend=7)
    fig.supxlabel("fANOVA importance (share of the objective's variance)", fontsize=9)
    fig.suptitle(
        f"{spec.name}: hyperparameter importances, mean over each method's cells", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, path)
