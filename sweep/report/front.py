"""Each cell's Pareto front on the validation objectives (sweeps with several objectives): the
configurations no other configuration of the cell beats on every objective, and the one the
sweep's `choose:` rule took from it (selection.py: the same rule as repeats and evaluate)."""

from __future__ import annotations

import pandas as pd

from .. import selection
from ..spec import SweepSpec
from .table import candidates


def cell_fronts(spec: SweepSpec, df: pd.DataFrame) -> dict[str, list[selection.Ranked]]:
    """Per cell with finished runs: its front, the chosen configuration first."""
    rule = selection.rule(spec)
    if len(rule.objectives) < 2 or any(m not in df for m in rule.metrics):
        return {}
    out = {}
    for cell, rows in df.groupby("cell", sort=False):
        ranked = selection.rank(candidates(spec, rows), rule)
        if ranked:
            on = selection.front(ranked, rule)
            # the chosen one first (the rule may pick off the front: a constraint's nearest miss)
            out[str(cell)] = [ranked[0]] + [r for r in on if r.config != ranked[0].config]
    return out


def front_section(spec: SweepSpec, df: pd.DataFrame) -> list[str]:
    """summary.md's 'Pareto front per cell'; nothing with one objective."""
    fronts = cell_fronts(spec, df)
    if not fronts:
        return []
    rule = selection.rule(spec)
    lines = [
        "## Pareto front per cell (validation)",
        "",
        f"Objectives: {rule.describe()}. Each row a configuration on its cell's front "
        "(full-budget trials; the tuned trial's values); ★ the one chosen, which the seed "
        "repeats re-ran and `sweep evaluate --top 1` evaluates.",
        "",
        "| cell | trial | " + " | ".join(f"`{m}`" for m in rule.metrics) + " | chosen |",
        "|" + "---|" * (len(rule.metrics) + 3),
    ]
    for cell in spec.cells():
        for i, r in enumerate(fronts.get(cell.key, [])):
            name = r.first.ref["run_name"]
            vals = " | ".join(f"{v:.4f}" for v in r.scores)
            lines.append(f"| {cell.key} | `{name}` | {vals} | {'★' if i == 0 else ''} |")
    return lines + [""]
