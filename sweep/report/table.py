"""The trials table (one row per student run, `trials.parquet` / `trials.csv`) and each cell's
best configuration, chosen by selection.py's rule, with its test numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import selection
from ..space import is_searched
from ..spec import SweepSpec

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
    scores: tuple[float, ...]  # the validation objectives it was chosen by, in the file's order
    n: int
    hp: str
    mean: dict[str, float]
    std: dict[str, float]

    @property
    def score(self) -> float:
        """The first objective's value (the only one with one objective)."""
        return self.scores[0]


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


def candidates(spec: SweepSpec, rows: pd.DataFrame) -> list[selection.Candidate]:
    """A cell's FINISHED rows as selection.py sees them (as `selection.from_runs` reads runs)."""
    obj = selection.rule(spec)
    out = []
    for _, row in rows[rows["status"] == "FINISHED"].iterrows():
        number, repeat = row["optuna_trial"], row["repeat"]
        values = tuple(float("nan") if pd.isna(row[m]) else float(row[m]) for m in obj.metrics)
        trained = row["epochs_trained"]
        out.append(
            selection.Candidate(
                config=str(row["config"]),
                number=None if pd.isna(number) else int(number),
                repeat=0 if pd.isna(repeat) else int(repeat),
                value=values[0] if len(values) == 1 else values,
                full=not pd.isna(trained) and int(trained) >= spec.budget.epochs,
                ref=row,
            )
        )
    return out


def best_configs(spec: SweepSpec, df: pd.DataFrame) -> dict[str, Best]:
    """Per cell with a finished run: its best configuration by the sweep's one rule
    (selection.py), with the test numbers over the configuration's finished runs."""
    obj = selection.rule(spec)
    if any(m not in df for m in obj.metrics):
        return {}
    metrics = [m for m in reported_metrics(spec, df) if m in df]
    out: dict[str, Best] = {}
    for cell, rows in df.groupby("cell", sort=False):
        best = selection.best(candidates(spec, rows), obj)
        if best is None:
            continue
        group = pd.DataFrame([c.ref for c in best.runs])
        first = group.iloc[0]
        out[str(cell)] = Best(
            cell=str(cell),
            config=best.config,
            run_name=str(first["run_name"]),
            run_id=str(first["run_id"]),
            scores=best.scores,
            n=len(group),
            hp=_hp_text(spec, first),
            mean={m: float(group[m].mean()) for m in metrics},
            std={m: float(group[m].std(ddof=1)) for m in metrics},
        )
    return out
