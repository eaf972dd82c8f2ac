"""`summary.md`: the best configuration per cell, the teacher-loss comparison (paired gains with
bootstrap CIs, gains.py, and what a conclusion still needs), the teachers, how each method and
teacher loss was checked against its paper (footnotes.py: a † on a name in the tables, a
footnote under them) and what is missing."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .. import selection
from ..spec import SweepSpec
from .data import SweepData
from .footnotes import Footnotes, footnotes
from .front import front_section
from .gains import BASES, REFERENCE_TEACHER, gain_gaps, lookup, teacher_gains
from .importance import Importances, importance_section, param_importances
from .stats import MIN_PAIRS, Interval
from .table import Best, reported_metrics

CI_TEXT = "95% CI, percentile bootstrap of the pairs"  # teacher_gains' default level


def _pct(mean: float, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    if std is None or math.isnan(std):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _short(metric: str) -> str:
    """`test/robust_acc/pgd20` -> `pgd20`, `test/clean_acc` -> `clean`, finals kept."""
    if metric.startswith("test/"):
        return "clean" if metric == "test/clean_acc" else metric.rsplit("/", 1)[1]
    return metric


def _names(notes: Footnotes, cell: Any) -> list[str]:
    """The cell's teacher label and method as the tables show them (marked, see footnotes)."""
    teacher = "—" if cell.teacher_loss == "none" else notes.teacher(cell.teacher_loss)
    return [teacher, notes.method(cell.method)]


def best_section(
    spec: SweepSpec, best: dict[str, Best], metrics: list[str], notes: Footnotes
) -> list[str]:
    obj = spec.objectives[0]
    rule = selection.rule(spec)
    chosen = f"{obj.mode} `{obj.metric}`" if rule.choose is None else rule.describe()
    lines = [
        "## Best configuration per cell",
        "",
        f"Chosen by {chosen} (validation) of the tuned trial; test accuracy in "
        "% as mean ± sample std over the configuration's n finished runs (repeats included); "
        "`final/` columns (from `sweep evaluate`) average the runs that have them.",
        "",
    ]
    rows = []
    for cell in spec.cells():
        b = best.get(cell.key)
        if b is None:
            rows.append(
                [cell.key, *_names(notes, cell), "no finished trial", "0", "—"]
                + ["—"] * len(metrics)
                + [""]
            )
            continue
        rows.append(
            [
                cell.key,
                *_names(notes, cell),
                b.hp,
                str(b.n),
                "/".join(f"{v:.4f}" for v in b.scores),
            ]
            + [_pct(b.mean[m], b.std[m]) for m in metrics]
            + [f"`{b.run_name}`"]
        )
    header = ["cell", "teacher", "method", "hyperparameters", "n", " / ".join(rule.metrics)] + [
        _short(m) for m in metrics
    ]
    return lines + _md_table(header + ["run"], rows) + [""]


def refit_section(
    spec: SweepSpec, refits: list[Any], best: dict[str, Best], metrics: list[str], notes: Footnotes
) -> list[str]:
    """`refit: true`: each cell's best configuration retrained on train + validation (the whole
    training split, as papers train), one run each: the numbers to print beside a paper's."""
    if not spec.refit:
        return []
    lines = [
        "## Refit on train + validation",
        "",
        "Each cell's best configuration (above) retrained with the same seed on the training and "
        "validation splits together; test accuracy in % of that one run (`final/` columns from "
        "`sweep evaluate`, where present).",
        "",
    ]
    by_cell = {r.data.tags.get("cell"): r for r in refits if r.info.status == "FINISHED"}
    rows = []
    for cell in spec.cells():
        r = by_cell.get(cell.key)
        if r is None:
            status = "not refit yet" if cell.key in best else "no best configuration"
            rows.append([cell.key, *_names(notes, cell), status] + ["—"] * len(metrics) + [""])
            continue
        m = r.data.metrics
        shown = [_pct(m[k]) if k in m else "—" for k in metrics]
        rows.append([cell.key, *_names(notes, cell), "finished"] + shown + [f"`{r.info.run_name}`"])
    header = ["cell", "teacher", "method", "refit"] + [_short(m) for m in metrics] + ["run"]
    return lines + _md_table(header, rows) + [""]


def comparison_section(
    spec: SweepSpec,
    gains: pd.DataFrame,
    best: dict[str, Best],
    metrics: list[str],
    names: Footnotes,
    gaps: list[str],
) -> list[str]:
    """Each teacher loss's paired gain over the `ce` teacher (gains.py), per method and train
    attack, on both bases; then what keeps the comparisons from a conclusion (`gaps`)."""
    lines = [
        f"## Teacher loss vs `{REFERENCE_TEACHER}` teacher",
        "",
        "Gain = test accuracy with the teacher loss minus with the "
        f"`{REFERENCE_TEACHER}` teacher, in percentage points: mean over paired runs "
        f"[{CI_TEXT}] (n pairs); no CI under {MIN_PAIRS} pairs. *seeds*: each cell's best "
        "configuration re-run with the same seeds in both cells (the gain at the tuned "
        "optimum, over seeds). *trials*: tuning trials that ran identical hyperparameters "
        "and seed in both cells, to the full budget (the method's paper setting and the "
        "sampler's random phase: the gain averaged over those configurations).",
        "",
    ]
    cells = spec.cells()
    for method in spec.grid.method:
        mine = [c for c in cells if c.method == method]
        lines.append(f"### {names.method(method)}")
        if mine and all(c.teacher_loss == "none" for c in mine):
            lines += ["", "No teacher: not compared.", ""]
            continue
        rows, notes = [], []
        for attack in spec.grid.train_attack:
            here = {c.teacher_loss: c for c in mine if c.train_attack == attack}
            if not here:
                continue
            ref = here.get(REFERENCE_TEACHER)
            if ref is None:
                notes.append(f"{attack}: no `{REFERENCE_TEACHER}` teacher cell: no comparison.")
                continue
            if ref.key not in best:
                notes.append(f"{attack}: `{ref.key}` has no finished trial yet: no comparison.")
            for loss, cell in here.items():
                if loss == REFERENCE_TEACHER:
                    continue
                if cell.key not in best:
                    notes.append(f"{attack}: `{cell.key}` has no finished trial yet.")
                shown = [
                    gain_text(lookup(gains, cell, m, basis)) for m in metrics for basis in BASES
                ]
                rows.append([attack, names.teacher(loss)] + shown)
        lines.append("")
        if rows:
            header = ["train attack", "teacher loss"] + [
                f"{_short(m)} {basis}" for m in metrics for basis in BASES
            ]
            lines += _md_table(header, rows) + [""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    if gaps:
        lines += ["### Not yet conclusive", ""] + [f"- {g}" for g in gaps] + [""]
    return lines


def gain_text(iv: Interval) -> str:
    """`+1.20 [-0.40, +2.80] (n=3)`; `+1.20 (n=2, no CI)` under MIN_PAIRS; `—` without pairs."""
    if iv.n == 0:
        return "—"
    if not iv.has_ci:
        return f"{iv.mean:+.2f} (n={iv.n}, no CI)"
    return f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}] (n={iv.n})"


def first_robust_metric(spec: SweepSpec) -> str | None:
    """The robust accuracy the teachers table shows: the suite's first attack (none if empty;
    the plots use the worst case over the suite, plots.worst_case_robust)."""
    attacks = spec.evaluation.attacks
    return f"test/robust_acc/{attacks[0].key}" if attacks else None


def teachers_section(spec: SweepSpec, teachers: list[Any], notes: Footnotes) -> list[str]:
    if not teachers:
        return []
    robust = first_robust_metric(spec) or "test/robust_acc"
    rows = []
    for t in sorted(teachers, key=lambda t: t.data.tags.get("teacher_label", "")):
        m = t.data.metrics
        ncmi = m.get("val/ncmi")
        rows.append(
            [
                notes.teacher(t.data.tags.get("teacher_label", t.info.run_name)),
                _pct(m.get("test/clean_acc", math.nan)),
                _pct(m.get(robust, math.nan)),
                f"{ncmi:.4f}" if ncmi is not None else "—",
            ]
        )
    header = ["teacher", "clean", _short(robust), "val NCMI"]
    return ["## Teachers", ""] + _md_table(header, rows) + [""]


def missing_lines(data: SweepData, df: pd.DataFrame, best: dict[str, Best]) -> list[str]:
    """What a finished sweep would have and this one lacks; empty when nothing is missing."""
    spec = data.spec
    per_cell = spec.budget.trials_per_cell
    cells = spec.cells()
    tuned = df[df["repeat"].fillna(0) == 0]
    started = tuned["cell"].value_counts()
    planned = len(cells) * per_cell
    out = []
    n_started = int(sum(min(int(started.get(c.key, 0)), per_cell) for c in cells))
    if n_started < planned:
        short = [
            f"`{c.key}` {int(started.get(c.key, 0))}/{per_cell}"
            for c in cells
            if started.get(c.key, 0) < per_cell
        ]
        out.append(
            f"{n_started} of {planned} planned trials ({len(cells)} cells × {per_cell}) have a "
            f"run; not started yet: {', '.join(short)}."
        )
    for c in cells:
        if c.key not in best:
            statuses = df[df["cell"] == c.key]["status"].value_counts()
            got = ", ".join(f"{n} {s}" for s, n in statuses.items()) or "no run"
            out.append(f"`{c.key}`: no finished trial ({got}).")
    for _, r in df[df["status"] != "FINISHED"].iterrows():
        why = r["failure_reason"] or r["stopped_because"]
        out.append(
            f"trial `{r['run_name']}` is {r['status']}"
            + (f" ({why})" if isinstance(why, str) and why else "")
            + (f", at epoch {r['epochs_trained']}" if not pd.isna(r["epochs_trained"]) else "")
            + "."
        )
    done = df[df["status"] == "FINISHED"]
    if "test/clean_acc" in df:
        for _, r in done[done["test/clean_acc"].isna()].iterrows():
            out.append(f"trial `{r['run_name']}` is FINISHED but has no test metrics.")
    if spec.repeats:
        repeats = df[df["repeat"].fillna(0) > 0]
        for c in cells:
            if c.key not in best:  # said above: no finished trial, nothing to repeat
                continue
            got = repeats[repeats["cell"] == c.key]
            ok = int((got["status"] == "FINISHED").sum())
            if ok < spec.repeats:
                out.append(
                    f"`{c.key}`: {ok} of {spec.repeats} seed repeats of its best configuration "
                    f"finished ({len(got)} started)."
                )
    no_study = [c.key for c in cells if c.key not in data.studies]
    if no_study:
        out.append(f"no Optuna study (no history plot) for: {', '.join(no_study)}.")
    return out


def summary_markdown(
    data: SweepData,
    df: pd.DataFrame,
    best: dict[str, Best],
    missing: list[str],
    *,
    gains: pd.DataFrame | None = None,
    importances: Importances | None = None,
) -> str:
    """summary.md. `gains`: gains.teacher_gains of the same df and best, when the caller has
    it already (it is computed here otherwise: bootstraps are not free)."""
    spec = data.spec
    if gains is None:
        gains = teacher_gains(spec, df, best)
    metrics = [m for m in reported_metrics(spec, df) if m in df] or ["test/clean_acc"]
    counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items()) or "none"
    n_test = spec.evaluation.test_examples or "all"
    lines = [
        f"# Sweep `{data.name}`",
        "",
        f"- grid: {len(spec.cells())} cells × {spec.budget.trials_per_cell} trials"
        + (f" + {spec.repeats} seed repeats of each cell's best" if spec.repeats else "")
        + (" + a refit of each cell's best on train + validation" if spec.refit else "")
        + ", "
        f"{spec.budget.epochs} epochs; dataset {spec.dataset.name}, student "
        f"{spec.student.arch}, {spec.threat.norm} eps {spec.threat.eps:.4g}",
        f"- objective: {selection.rule(spec).describe()} (validation split; test numbers never "
        "choose)",
        f"- test suite: clean, {', '.join(a.key for a in spec.evaluation.attacks)} "
        f"on {n_test} test examples per trial",
        f"- trials in MLflow: {len(df)} ({counts})",
        "",
    ]
    notes = footnotes(spec, data.teachers)
    lines += best_section(spec, best, metrics, notes)
    lines += front_section(spec, df)
    lines += refit_section(spec, data.refits, best, metrics, notes)
    gaps = gain_gaps(spec, df, best, gains)
    lines += comparison_section(spec, gains, best, metrics, notes, gaps)
    if importances is None:
        importances = param_importances(spec, data.studies)
    lines += importance_section(spec, importances, notes)
    lines += teachers_section(spec, data.teachers, notes)
    lines += notes.section()
    lines += ["## Missing", ""]
    lines += [f"- {m}" for m in missing] if missing else ["Nothing: every trial finished."]
    return "\n".join(lines) + "\n"
