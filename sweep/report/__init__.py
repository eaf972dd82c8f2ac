"""`sweep report NAME`: the tables and plots of a sweep that go into a paper.

One module a job: `data.py` reads the sweep, `table.py` makes the trials table and picks each
cell's best (selection.py's rule), `markdown.py` writes summary.md (with `footnotes.py`'s marks
and fidelity footnotes), `plots.py` draws; this file writes them all and logs them to MLflow.

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
  teacher per method and train attack, in percentage points), the teachers, how each method and
  teacher loss was checked against its paper (footnotes.py: its fidelity record as a footnote;
  a † after the name, in every table, of one that is not the paper's as published:
  reconstructed, kdsweep's own, or with known departures), and what is missing.
- `gains.csv` and `gains.png` (gains.py, stats.py): the question the sweep is run for. For each
  method × training attack, each teacher loss's gain over the `ce` teacher on clean and every
  robust test metric, in percentage points, as the mean of paired differences with a percentile
  bootstrap 95% CI (from 3 pairs on) on two bases: `seeds`, the cells' best configurations
  re-run with the same seeds (`repeats:`), and `trials`, tuning trials with the same number,
  seed and hyperparameters (the paired random phase, samplers.py). The heatmap: teacher loss ×
  method, a panel per training attack and metric, `*` where the CI excludes 0.
- `importances.csv` and `importances.png` (importance.py): per method, each searched
  hyperparameter's fANOVA importance (Optuna's evaluator) for each objective, the mean over the
  method's cells with at least 4 full-budget trials (and n cells); cells skipped say why.
- `pareto.png`: test clean vs worst-case robust accuracy (the minimum over `evaluation.attacks`,
  plots.worst_case_robust), one point per cell's best configuration, the Pareto front drawn.
- `fronts.png`: one panel per cell, its full-budget tuned trials on the same axes, the cell's
  Pareto front and its chosen best (★). With several objectives, summary.md also lists each
  cell's front on the validation objectives and the configuration `choose:` took from it.
- `history/<cell>.png`: the cell's Optuna study, objective per trial number and best so far
  (characters other than letters, digits and `_.,=+-` in a cell key become `_`).

Choosing the best: selection.py's rule, the one `sweep status`, the seed repeats and
`sweep evaluate` use (by the first objective on validation; full-budget trials; a configuration
scored by its tuned trial); `sweep evaluate --top 1` evaluates the run named here first.
"""

from __future__ import annotations

from pathlib import Path

from ..layout import report_out
from ..tracking import Tracker
from .data import SweepData, read_sweep
from .footnotes import footnotes
from .gains import plot_gains, teacher_gains, write_gains
from .importance import param_importances, write_importances
from .markdown import missing_lines, summary_markdown
from .plots import pareto_front, plot_cell_fronts, plot_history, plot_pareto, safe_name
from .stats import MIN_PAIRS
from .table import Best, best_configs, trials_table, write_table


def log_to_parent(tracker: Tracker, run_id: str, out: Path, files: list[Path]) -> None:
    """Exactly the files written now, under `report/`, in one upload (the `out` folder may hold
    other things when the user chose it)."""
    tracker.log_artifacts(run_id, {str(f.relative_to(out)): f for f in files}, path="report")


def write_report(name: str, storage: str | Path = "./sweeps", out: str | Path | None = None) -> str:
    """Write the report of sweep `name` and log it to the sweep's parent MLflow run; returns a
    short summary of what was written and what is missing. FileNotFoundError: no such sweep."""
    checked = report_out(out) if out else None  # before anything is read
    data = read_sweep(name, storage)
    out_dir = checked or data.report_dir
    (out_dir / "history").mkdir(parents=True, exist_ok=True)
    df = trials_table(data.spec, data.students)
    best = best_configs(data.spec, df)
    missing = missing_lines(data, df, best)
    gains = teacher_gains(data.spec, df, best)  # bootstraps: computed once
    imp = param_importances(data.spec, data.studies)
    files = write_table(df, out_dir)
    summary = summary_markdown(data, df, best, missing, gains=gains, importances=imp)
    (out_dir / "summary.md").write_text(summary)
    files.append(out_dir / "summary.md")
    notes = footnotes(data.spec, data.teachers)
    files.append(write_gains(gains, out_dir))
    files.append(plot_gains(gains, out_dir / "gains.png", notes=notes))
    files += write_importances(data.spec, imp, out_dir, notes)
    files.append(plot_pareto(data.spec, best, out_dir / "pareto.png", notes))
    files.append(plot_cell_fronts(data.spec, df, best, out_dir / "fronts.png", notes))
    for cell, trials in data.studies.items():
        path = out_dir / "history" / f"{safe_name(cell)}.png"
        files.append(plot_history(data.spec, cell, trials, path))
    parent = data.state["parent_run_id"]
    log_to_parent(data.tracker, parent, out_dir, files)
    finished = int((df["status"] == "FINISHED").sum())
    n_ci = int(((gains["basis"] == "seeds") & (gains["n"] >= MIN_PAIRS)).sum())
    lines = [
        f"report of sweep {name}: {out_dir}",
        f"  trials.parquet, trials.csv: {len(df)} trials ({finished} finished)",
        f"  summary.md: best configuration of {len(best)} of {len(data.spec.cells())} cells",
        f"  gains.csv, gains.png: {len(gains)} paired gains over the ce teacher "
        f"({n_ci} at the best configurations with a 95% CI)",
        f"  importances.csv, importances.png: {len(imp.cells)} cells with enough trials",
        f"  pareto.png, fronts.png, history/: {len(data.studies)} optimisation-history plots",
        f"  MLflow: artifacts report/ of the sweep's run {parent}",
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): see summary.md; " + missing[0])
    else:
        lines.append("  nothing missing: every planned trial finished")
    return "\n".join(lines)


__all__ = [
    "Best",
    "SweepData",
    "best_configs",
    "pareto_front",
    "read_sweep",
    "trials_table",
    "write_report",
]
