"""`sweep report NAME`: the tables and plots of a sweep that go into a paper.

Read-only with respect to the sweep: one MLflow query (every run tagged with the sweep's name:
the parent, the student trials, the teachers) and one read of each cell's Optuna study. The only
thing it adds to the sweep's stores is the report itself, as artifacts `report/...` of the
sweep's parent run. It works on a sweep that is still running or was stopped: it reports what
exists and its summary says what is missing.

Files written (to `<storage>/<name>/report`, or `out`):

- `trials.parquet` (pyarrow) and `trials.csv`: one row per student run (teacher runs are not
  trials), sorted by cell (grid order), Optuna trial number and repeat. Columns, in this order:
  `run_id, run_name, status, cell, teacher_loss, method, train_attack, optuna_trial, seed,
  epochs_trained, config, config_key, repeat, start_time, end_time, failure_reason,
  stopped_because, sanity_warnings`; then `param.<name>` for every MLflow param of any run
  (prefixed because params such as `method` and `seed` repeat the tag columns; a column is
  numeric when every value in it is a number, else text as logged); then every `train/...`,
  `val/...`, `test/...` and `final/...` metric under its MLflow name, with the run's last value.
  `config` is the run's `config_key` tag, or its run id when it has none: the runs sharing it
  are one configuration (a tuned trial and its re-runs with new seeds, tagged `repeat`=1..N).
  `epochs_trained` is the tag set when the trial was tested, else the last epoch logged.
- `summary.md`: the best configuration of each cell with its test accuracies (mean ± std over
  the configuration's finished runs, and n), the teacher-loss comparison (gain over the `ce`
  teacher per method and train attack, in percentage points), the teachers, and what is missing.
- `pareto.png`: test clean vs robust accuracy (first attack of `evaluation.attacks`), one point
  per cell's best configuration, the Pareto front drawn.
- `history/<cell>.png`: the cell's Optuna study, objective per trial number and best so far
  (characters other than letters, digits and `_.,=+-` in a cell key become `_`).

Choosing the best: selection.py's rule, the one `sweep status`, the seed repeats and
`sweep evaluate` use (by the first objective on validation; full-budget trials; a configuration
scored by its tuned trial); `sweep evaluate --top 1` evaluates the run named here first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import selection
from .layout import open_sweep
from .progress import cell_trials
from .space import is_searched
from .spec import SweepSpec
from .tracking import Tracker

FIXED_COLUMNS = [
    "run_id",
    "run_name",
    "status",
    "cell",
    "teacher_loss",
    "method",
    "train_attack",
    "optuna_trial",
    "seed",
    "epochs_trained",
    "config",
    "config_key",
    "repeat",
    "start_time",
    "end_time",
    "failure_reason",
    "stopped_because",
    "sanity_warnings",
]
METRIC_PREFIXES = ("train/", "val/", "test/", "final/")
INT_COLUMNS = ("optuna_trial", "seed", "epochs_trained", "repeat")
REFERENCE_TEACHER = "ce"


# --- reading the sweep ------------------------------------------------------------------------
@dataclass
class SweepData:
    """Everything the report is made from, read once."""

    name: str
    spec: SweepSpec
    state: dict[str, Any]
    tracker: Tracker
    students: list[Any]
    teachers: list[Any]
    studies: dict[str, list[optuna.trial.FrozenTrial]] = field(default_factory=dict)
    report_dir: Path | None = None  # where the report goes unless told (layout.py)


def read_sweep(name: str, storage: str | Path) -> SweepData:
    """The sweep's spec, its MLflow runs (one paged query, split by kind in memory) and its
    Optuna studies; FileNotFoundError if there is no such sweep."""
    opened = open_sweep(name, storage)
    state, spec = opened.state, opened.spec
    tracker = Tracker(state["mlflow_tracking_uri"], state["experiment"])
    runs = tracker.sweep_runs(name)
    return SweepData(
        name=name,
        spec=spec,
        state=state,
        tracker=tracker,
        students=[r for r in runs if r.data.tags.get("kind") == "student"],
        teachers=[r for r in runs if r.data.tags.get("kind") == "teacher"],
        studies=cell_trials(spec, opened.layout, create=False),
        report_dir=opened.layout.report,
    )


# --- the trials table -------------------------------------------------------------------------
def _int_or_none(v: str | None) -> int | None:
    try:
        return int(float(v)) if v not in (None, "") else None
    except ValueError:
        return None


def _last_epoch(run: Any) -> int | None:
    """The last step a val/ metric was logged at: the epoch a running or failed trial reached."""
    steps = [m.step for m in run.data.to_proto().metrics if m.key.startswith("val/")]
    return max(steps) if steps else None


def _ms_time(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def trial_row(run: Any) -> dict[str, Any]:
    """One student run as a flat row (see the module docstring for the names)."""
    tags, info = run.data.tags, run.info
    epochs = _int_or_none(tags.get("epochs_trained"))
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "cell": tags.get("cell"),
        "teacher_loss": tags.get("teacher_loss"),
        "method": tags.get("method"),
        "train_attack": tags.get("train_attack"),
        "optuna_trial": _int_or_none(tags.get("optuna_trial")),
        "seed": _int_or_none(run.data.params.get("seed")),
        "epochs_trained": epochs if epochs is not None else _last_epoch(run),
        "config": tags.get("config_key") or info.run_id,
        "config_key": tags.get("config_key"),
        "repeat": _int_or_none(tags.get("repeat")),
        "start_time": _ms_time(info.start_time),
        "end_time": _ms_time(info.end_time),
        "failure_reason": tags.get("failure_reason"),
        "stopped_because": tags.get("stopped_because"),
        "sanity_warnings": tags.get("sanity_warnings"),
    }
    row |= {f"param.{k}": v for k, v in run.data.params.items()}
    row |= {k: v for k, v in run.data.metrics.items() if k.startswith(METRIC_PREFIXES)}
    return row


def _numeric_if_all_numbers(col: pd.Series) -> pd.Series:
    """MLflow params are strings; a column of numbers becomes numeric, anything else stays."""
    num = pd.to_numeric(col, errors="coerce")
    return num if num.notna().sum() == col.notna().sum() else col


def trials_table(spec: SweepSpec, students: list[Any]) -> pd.DataFrame:
    """One row per student run, columns in the documented order, sorted for reading."""
    df = pd.DataFrame([trial_row(r) for r in students])
    for c in FIXED_COLUMNS:
        if c not in df:
            df[c] = None
    params = sorted(c for c in df.columns if c.startswith("param."))
    metrics = sorted(c for c in df.columns if c.startswith(METRIC_PREFIXES))
    df = df[FIXED_COLUMNS + params + metrics]
    for c in params:
        df[c] = _numeric_if_all_numbers(df[c])
    for c in INT_COLUMNS:
        df[c] = pd.array(df[c], dtype="Int64")
    for c in ("start_time", "end_time"):
        df[c] = pd.to_datetime(df[c], utc=True)
    order = {c.key: i for i, c in enumerate(spec.cells())}
    df["_cell_order"] = df["cell"].map(order).fillna(len(order))
    df = df.sort_values(["_cell_order", "cell", "optuna_trial", "repeat", "start_time"])
    return df.drop(columns="_cell_order").reset_index(drop=True)


def arrow_table(df: pd.DataFrame) -> pa.Table:
    """The table for Parquet. The UTC timestamps are converted here, not by pyarrow's pandas
    path, which reads them through a `Series.values` that pandas 3.1 deprecates."""
    times = ["start_time", "end_time"]
    table = pa.Table.from_pandas(df.drop(columns=times), preserve_index=False)
    for c in times:
        utc = df[c].dt.tz_convert(None).to_numpy()
        col = pa.array(utc, type=pa.timestamp("ms"), from_pandas=True).cast(
            pa.timestamp("ms", tz="UTC")
        )
        table = table.add_column(list(df.columns).index(c), c, col)
    return table


def write_table(df: pd.DataFrame, out: Path) -> list[Path]:
    """Parquet through pyarrow (types kept) and CSV (for a spreadsheet)."""
    pq.write_table(arrow_table(df), out / "trials.parquet")
    df.to_csv(out / "trials.csv", index=False)
    return [out / "trials.parquet", out / "trials.csv"]


# --- best configuration per cell ----------------------------------------------------------------
@dataclass
class Best:
    """A cell's best configuration and the test numbers over its finished runs."""

    cell: str
    config: str
    run_name: str
    run_id: str
    score: float  # the validation objective it was chosen by
    n: int
    hp: str
    mean: dict[str, float]
    std: dict[str, float]


def reported_metrics(spec: SweepSpec, df: pd.DataFrame) -> list[str]:
    """Clean, then each attack of the suite in the file's order, then `final/` ones present."""
    names = ["test/clean_acc"] + [f"test/robust_acc/{a.key}" for a in spec.evaluation.attacks]
    final = sorted(c for c in df.columns if c.startswith("final/") and "/examples/" not in c)
    return names + final


def _hp_text(spec: SweepSpec, row: pd.Series) -> str:
    """The searched hyperparameters of a configuration, as `name=value`."""
    out = []
    for k, v in spec.cell_space(str(row["method"])).items():
        value = row.get(f"param.{k}")
        if is_searched(v) and value is not None and not pd.isna(value):
            out.append(f"{k}={value:.3g}" if isinstance(value, float) else f"{k}={value}")
    return ", ".join(out) or "-"


def _candidates(spec: SweepSpec, rows: pd.DataFrame) -> list[selection.Candidate]:
    """A cell's FINISHED rows as selection.py sees them (as `selection.from_runs` reads runs)."""
    obj = selection.objective(spec)
    out = []
    for _, row in rows[rows["status"] == "FINISHED"].iterrows():
        value, number, repeat = row[obj.metric], row["optuna_trial"], row["repeat"]
        trained = row["epochs_trained"]
        out.append(
            selection.Candidate(
                config=str(row["config"]),
                number=None if pd.isna(number) else int(number),
                repeat=0 if pd.isna(repeat) else int(repeat),
                value=float("nan") if pd.isna(value) else float(value),
                full=not pd.isna(trained) and int(trained) >= spec.budget.epochs,
                ref=row,
            )
        )
    return out


def best_configs(spec: SweepSpec, df: pd.DataFrame) -> dict[str, Best]:
    """Per cell with a finished run: its best configuration by the sweep's one rule
    (selection.py), with the test numbers over the configuration's finished runs."""
    obj = selection.objective(spec)
    if obj.metric not in df:
        return {}
    metrics = [m for m in reported_metrics(spec, df) if m in df]
    out: dict[str, Best] = {}
    for cell, rows in df.groupby("cell", sort=False):
        best = selection.best(_candidates(spec, rows), obj)
        if best is None:
            continue
        group = pd.DataFrame([c.ref for c in best.runs])
        first = group.iloc[0]
        out[str(cell)] = Best(
            cell=str(cell),
            config=best.config,
            run_name=str(first["run_name"]),
            run_id=str(first["run_id"]),
            score=best.score,
            n=len(group),
            hp=_hp_text(spec, first),
            mean={m: float(group[m].mean()) for m in metrics},
            std={m: float(group[m].std(ddof=1)) for m in metrics},
        )
    return out


# --- summary.md ---------------------------------------------------------------------------------
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


def best_section(spec: SweepSpec, best: dict[str, Best], metrics: list[str]) -> list[str]:
    obj = spec.objectives[0]
    lines = [
        "## Best configuration per cell",
        "",
        f"Chosen by {obj.mode} `{obj.metric}` (validation) of the tuned trial; test accuracy in "
        "% as mean ± sample std over the configuration's n finished runs (repeats included); "
        "`final/` columns (from `sweep evaluate`) average the runs that have them.",
        "",
    ]
    rows = []
    for cell in spec.cells():
        b = best.get(cell.key)
        if b is None:
            rows.append([cell.key, "no finished trial", "0", "—"] + ["—"] * len(metrics) + [""])
            continue
        rows.append(
            [cell.key, b.hp, str(b.n), f"{b.score:.4f}"]
            + [_pct(b.mean[m], b.std[m]) for m in metrics]
            + [f"`{b.run_name}`"]
        )
    header = ["cell", "hyperparameters", "n", obj.metric] + [_short(m) for m in metrics]
    return lines + _md_table(header + ["run"], rows) + [""]


def comparison_section(spec: SweepSpec, best: dict[str, Best], metrics: list[str]) -> list[str]:
    """Each teacher loss's gain over the `ce` teacher, per method and train attack."""
    lines = [
        f"## Teacher loss vs `{REFERENCE_TEACHER}` teacher",
        "",
        "Gain in percentage points of the best configuration's mean test accuracy over that of "
        f"the `{REFERENCE_TEACHER}` teacher's cell with the same method and train attack.",
        "",
    ]
    cells = spec.cells()
    for method in spec.grid.method:
        mine = [c for c in cells if c.method == method]
        lines.append(f"### {method}")
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
                continue
            for loss, cell in here.items():
                if loss == REFERENCE_TEACHER:
                    continue
                b = best.get(cell.key)
                if b is None:
                    notes.append(f"{attack}: `{cell.key}` has no finished trial yet.")
                    continue
                rows.append([attack, loss] + [_gain(b, best[ref.key], m) for m in metrics])
        lines.append("")
        if rows:
            header = ["train attack", "teacher loss"] + [_short(m) for m in metrics]
            lines += _md_table(header, rows) + [""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def _gain(b: Best, ref: Best, metric: str) -> str:
    """Percentage points of `b` over `ref`; a dash where either lacks the metric."""
    d = b.mean.get(metric, math.nan) - ref.mean.get(metric, math.nan)
    return "—" if math.isnan(d) else f"{100 * d:+.2f}"


def pareto_metric(spec: SweepSpec) -> str | None:
    """The robust accuracy the Pareto plot uses: the suite's first attack (none if empty)."""
    attacks = spec.evaluation.attacks
    return f"test/robust_acc/{attacks[0].key}" if attacks else None


def teachers_section(spec: SweepSpec, teachers: list[Any]) -> list[str]:
    if not teachers:
        return []
    robust = pareto_metric(spec) or "test/robust_acc"
    rows = []
    for t in sorted(teachers, key=lambda t: t.data.tags.get("teacher_label", "")):
        m = t.data.metrics
        ncmi = m.get("val/ncmi")
        rows.append(
            [
                t.data.tags.get("teacher_label", t.info.run_name),
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
    data: SweepData, df: pd.DataFrame, best: dict[str, Best], missing: list[str]
) -> str:
    spec = data.spec
    obj = spec.objectives[0]
    metrics = [m for m in reported_metrics(spec, df) if m in df] or ["test/clean_acc"]
    counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items()) or "none"
    n_test = spec.evaluation.test_examples or "all"
    lines = [
        f"# Sweep `{data.name}`",
        "",
        f"- grid: {len(spec.cells())} cells × {spec.budget.trials_per_cell} trials"
        + (f" + {spec.repeats} seed repeats of each cell's best" if spec.repeats else "")
        + ", "
        f"{spec.budget.epochs} epochs; dataset {spec.dataset.name}, student "
        f"{spec.student.arch}, {spec.threat.norm} eps {spec.threat.eps:.4g}",
        f"- objective: {obj.mode} `{obj.metric}` (validation split; test numbers never choose)",
        f"- test suite: clean, {', '.join(a.key for a in spec.evaluation.attacks)} "
        f"on {n_test} test examples per trial",
        f"- trials in MLflow: {len(df)} ({counts})",
        "",
    ]
    lines += best_section(spec, best, metrics)
    lines += comparison_section(spec, best, metrics)
    lines += teachers_section(spec, data.teachers)
    lines += ["## Missing", ""]
    lines += [f"- {m}" for m in missing] if missing else ["Nothing: every trial finished."]
    return "\n".join(lines) + "\n"


# --- plots --------------------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    fig.savefig(path, dpi=120)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (both maximised), by increasing x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def plot_pareto(spec: SweepSpec, best: dict[str, Best], path: Path) -> Path:
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
            ax.annotate(cell, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
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


# --- MLflow and the entry point -----------------------------------------------------------------
def log_to_parent(tracker: Tracker, run_id: str, out: Path, files: list[Path]) -> None:
    """Exactly the files written now, under `report/`, in one upload (the `out` folder may hold
    other things when the user chose it)."""
    tracker.log_artifacts(run_id, {str(f.relative_to(out)): f for f in files}, path="report")


def write_report(name: str, storage: str | Path = "./sweeps", out: str | Path | None = None) -> str:
    """Write the report of sweep `name` and log it to the sweep's parent MLflow run; returns a
    short summary of what was written and what is missing. FileNotFoundError: no such sweep."""
    data = read_sweep(name, storage)
    out_dir = Path(out) if out else data.report_dir
    (out_dir / "history").mkdir(parents=True, exist_ok=True)
    df = trials_table(data.spec, data.students)
    best = best_configs(data.spec, df)
    missing = missing_lines(data, df, best)
    files = write_table(df, out_dir)
    (out_dir / "summary.md").write_text(summary_markdown(data, df, best, missing))
    files.append(out_dir / "summary.md")
    files.append(plot_pareto(data.spec, best, out_dir / "pareto.png"))
    for cell, trials in data.studies.items():
        path = out_dir / "history" / f"{safe_name(cell)}.png"
        files.append(plot_history(data.spec, cell, trials, path))
    parent = data.state["parent_run_id"]
    log_to_parent(data.tracker, parent, out_dir, files)
    finished = int((df["status"] == "FINISHED").sum())
    lines = [
        f"report of sweep {name}: {out_dir}",
        f"  trials.parquet, trials.csv: {len(df)} trials ({finished} finished)",
        f"  summary.md: best configuration of {len(best)} of {len(data.spec.cells())} cells",
        f"  pareto.png, history/: {len(data.studies)} optimisation-history plots",
        f"  MLflow: artifacts report/ of the sweep's run {parent}",
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): see summary.md; " + missing[0])
    else:
        lines.append("  nothing missing: every planned trial finished")
    return "\n".join(lines)
