"""The report's plots: the Pareto front of the cells' best configurations, and each cell's
optimisation history. Drawn with matplotlib's Agg canvas, without pyplot's global state."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..spec import SweepSpec
from .footnotes import Footnotes
from .markdown import pareto_metric
from .table import Best


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    fig.savefig(path, dpi=120)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (both maximised), by increasing x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_pareto(
    spec: SweepSpec, best: dict[str, Best], path: Path, notes: Footnotes | None = None
) -> Path:
    """One point per cell's best configuration, named by its cell; with `notes`, a cell whose
    method or teacher is not the paper's as published carries the tables' mark."""
    robust = pareto_metric(spec) or "no attack"
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    pts = {
        k: (100 * b.mean["test/clean_acc"], 100 * b.mean[robust])
        for k, b in best.items()
        if not math.isnan(b.mean.get("test/clean_acc", math.nan))
        and not math.isnan(b.mean.get(robust, math.nan))
    }
    if pts:
        for cell, (x, y) in pts.items():
            b = best[cell]
            ax.errorbar(
                x,
                y,
                xerr=None if math.isnan(b.std["test/clean_acc"]) else 100 * b.std["test/clean_acc"],
                yerr=None if math.isnan(b.std[robust]) else 100 * b.std[robust],
                fmt="o",
                color="tab:blue",
                capsize=3,
            )
            name = notes.cell(cell) if notes else cell
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(list(pts.values()))
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
    else:
        why = "no finished trial yet" if pareto_metric(spec) else "evaluation.attacks is empty"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("test clean accuracy (%)")
    ax.set_ylabel(f"test robust accuracy, {robust.rsplit('/', 1)[-1]} (%)")
    ax.set_title(f"{spec.name}: best configuration per cell")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


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
