"""The report's hyperparameter importances (importance.py) and its worst-case clean-vs-robust
plots (plots.py): on synthetic Optuna trials and hand-made trials tables, no sweep run.

Fast: fANOVA on a few small in-memory studies (about 0.1 s each) and a few PNGs.
"""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import tiny_spec_dict

from sweep.report.importance import (
    COLUMNS,
    MIN_TRIALS,
    cell_importance,
    importance_section,
    param_importances,
    usable_trials,
    write_importances,
)
from sweep.report.plots import (
    cell_front_points,
    lacks_attacks,
    plot_cell_fronts,
    plot_pareto,
    worst_case_metric,
    worst_case_robust,
)
from sweep.report.table import Best
from sweep.spec import Objective, parse_spec

D = optuna.distributions
DISTS = {
    "temperature": D.FloatDistribution(1.0, 4.0),
    "alpha": D.FloatDistribution(0.2, 0.8),
    "optimizer": D.CategoricalDistribution(["sgd", "adam"]),
}
FGSM, PGD = "test/robust_acc/fgsm", "test/robust_acc/pgd20"


@pytest.fixture
def spec(tmp_path):
    """Cells ce.kd.pgd, mse.kd.pgd, ce.ard.pgd, mse.ard.pgd; 2 epochs; attacks fgsm, pgd20."""
    return parse_spec(tiny_spec_dict(tmp_path))


def _trials(n, values, seed=0, params=DISTS, **attrs) -> list[optuna.trial.FrozenTrial]:
    """`n` COMPLETE trials with parameters drawn at random; `values(params)` -> objective
    values."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = {}
        for k, d in params.items():
            if isinstance(d, D.CategoricalDistribution):
                p[k] = d.choices[int(rng.integers(len(d.choices)))]
            else:
                p[k] = float(rng.uniform(d.low, d.high))
        out.append(
            optuna.trial.create_trial(
                params=p, distributions=dict(params), values=values(p), user_attrs=attrs
            )
        )
    return out


def by_temperature(p):
    return [0.1 * p["temperature"]]


# --- importances ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_parameter_the_objective_depends_on_ranks_first(spec, seed):
    got, why = cell_importance(spec, "ce.kd.pgd", "kd", _trials(8, by_temperature, seed))
    assert why == [] and got.trials == 8
    imp = got.by_objective["val/robust_acc"]
    assert set(imp) == set(DISTS) and sum(imp.values()) == pytest.approx(1.0)
    assert max(imp, key=imp.get) == "temperature" and imp["temperature"] > 0.5, imp


def test_each_objective_has_its_own_importances(spec):
    """Two objectives, one driven by temperature, the other by alpha: each objective's table
    names its own driver (each is computed from its own values, not the first's)."""
    two = spec.model_copy(
        update={"objective": [Objective(metric="val/robust_acc"), Objective(metric="val/loss")]}
    )
    trials = _trials(10, lambda p: [0.1 * p["temperature"], 5 * p["alpha"]], seed=3)
    got, _ = cell_importance(two, "ce.kd.pgd", "kd", trials)
    robust, loss = got.by_objective["val/robust_acc"], got.by_objective["val/loss"]
    assert max(robust, key=robust.get) == "temperature"
    assert max(loss, key=loss.get) == "alpha"


def test_only_complete_full_budget_trials_count(spec):
    """A trial ASHA stopped but told COMPLETE (epochs_trained < budget), a pruned and a failed
    one do not change the importances, however extreme their values."""
    good = _trials(6, by_temperature, seed=4)
    stopped = _trials(3, lambda p: [100 * p["alpha"]], seed=5, epochs_trained=1)
    pruned = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED)
    failed = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)
    full = _trials(1, by_temperature, seed=6, epochs_trained=spec.budget.epochs)
    mixed = good + stopped + [pruned, failed] + full
    assert usable_trials(spec, mixed) == good + full
    alone, _ = cell_importance(spec, "c", "kd", good + full)
    got, _ = cell_importance(spec, "c", "kd", mixed)
    assert got.trials == 7 and got.by_objective == alone.by_objective


def test_method_means_over_its_cells_and_the_skipped_cells_say_why(spec):
    """kd: two cells with enough trials (the mean of their two importances, n=2); ard: one cell
    with too few trials, one without a study. A hyperparameter the file fixes (alpha: in no
    trial's params) is absent."""
    no_alpha = {k: v for k, v in DISTS.items() if k != "alpha"}
    studies = {
        "ce.kd.pgd": _trials(8, by_temperature, seed=7, params=no_alpha),
        "mse.kd.pgd": _trials(8, lambda p: [0.1 * p["temperature"] + 1], seed=8, params=no_alpha),
        "ce.ard.pgd": _trials(MIN_TRIALS - 1, by_temperature, seed=9),
    }
    imp = param_importances(spec, studies)
    assert [c.cell for c in imp.cells] == ["ce.kd.pgd", "mse.kd.pgd"]
    assert imp.skipped == [
        ("ce.ard.pgd", f"{MIN_TRIALS - 1} completed full-budget trials (needs {MIN_TRIALS})"),
        ("mse.ard.pgd", "no Optuna study"),
    ]
    t = imp.table
    assert list(t.columns) == COLUMNS
    assert set(t["method"]) == {"kd"} and set(t["param"]) == {"temperature", "optimizer"}
    for param in ("temperature", "optimizer"):
        each = [c.by_objective["val/robust_acc"][param] for c in imp.cells]
        (row,) = t[t["param"] == param].itertuples()
        assert row.importance == pytest.approx(np.mean(each))
        assert row.importance_std == pytest.approx(np.std(each, ddof=1))
        assert row.n_cells == 2 and row.objective == "val/robust_acc"
    assert list(t["param"]) == ["temperature", "optimizer"]  # by decreasing importance


def test_cells_with_nothing_to_attribute_are_skipped_with_a_reason(spec):
    same = _trials(5, by_temperature, seed=10)
    fixed = [
        optuna.trial.create_trial(params=same[0].params, distributions=DISTS, values=[v])
        for v in (0.1, 0.2, 0.3, 0.4)
    ]
    none = [optuna.trial.create_trial(params={}, distributions={}, values=[v]) for v in range(4)]
    flat = _trials(5, lambda p: [0.5], seed=11)
    assert cell_importance(spec, "c", "kd", fixed) == (
        None,
        ["no searched hyperparameter varies over its 4 trials"],
    )
    assert cell_importance(spec, "c", "ce", none) == (
        None,
        ["no searched hyperparameter over its 4 trials"],
    )
    assert cell_importance(spec, "c", "kd", flat) == (
        None,
        ["`val/robust_acc` is the same in all 5 trials"],
    )
    assert cell_importance(spec, "c", "kd", []) == (
        None,
        [f"0 completed full-budget trials (needs {MIN_TRIALS})"],
    )


def test_section_csv_and_plot(spec, tmp_path):
    studies = {
        "ce.kd.pgd": _trials(8, by_temperature, seed=12),
        "ce.ard.pgd": _trials(2, by_temperature, seed=13),
    }
    imp = param_importances(spec, studies)
    files = write_importances(spec, imp, tmp_path)
    assert [f.name for f in files] == ["importances.csv", "importances.png"]
    csv = pd.read_csv(tmp_path / "importances.csv")
    assert list(csv.columns) == COLUMNS and len(csv) == 3  # kd's three hyperparameters
    _assert_png(tmp_path / "importances.png")
    lines = importance_section(spec, imp)
    text = "\n".join(lines)
    assert lines[0] == "## Hyperparameter importances"
    kd = text.split("### kd", 1)[1].split("### ard", 1)[0]
    first = next(ln for ln in kd.splitlines() if ln.startswith("| `"))
    top = csv.iloc[0]
    assert first.startswith(f"| `{top.param}` | {top.importance:.2f} (n=1) |")
    assert "### ard\n\nNo cell with enough trials." in text
    assert "`ce.ard.pgd`: 2 completed full-budget trials (needs 4)" in text
    assert "`mse.kd.pgd`: no Optuna study" in text


# --- the worst-case robust axis ---------------------------------------------------------------
def test_worst_case_robust_is_the_minimum_over_the_suite(spec):
    row = {"test/clean_acc": 0.9, FGSM: 0.5, PGD: 0.3, "test/robust_acc/other": 0.01}
    assert worst_case_robust(row, spec) == 0.3 and worst_case_metric(row, spec) == PGD
    assert lacks_attacks(row, spec) == []  # an attack outside the suite is not looked at
    half = pd.Series({"test/clean_acc": 0.9, FGSM: 0.5, PGD: math.nan})
    assert worst_case_robust(half, spec) == 0.5 and lacks_attacks(half, spec) == [PGD]
    assert math.isnan(worst_case_robust({"test/clean_acc": 0.9}, spec))
    assert worst_case_metric({FGSM: 0.4, PGD: 0.4}, spec) == FGSM  # tie: the first listed


# --- the per-cell fronts ----------------------------------------------------------------------
def _row(run, cell, clean, fgsm, pgd, status="FINISHED", repeat=None, epochs=2):
    return {
        "run_id": run,
        "status": status,
        "cell": cell,
        "repeat": repeat,
        "epochs_trained": epochs,
        "test/clean_acc": clean,
        FGSM: fgsm,
        PGD: pgd,
    }


@pytest.fixture
def table():
    """ce.kd.pgd: three full-budget tuned trials (a dominates c), plus a seed repeat, a trial
    stopped early and a running one, all of which would be on the front if counted;
    mse.kd.pgd: one trial lacking pgd20; the ard cells: nothing."""
    rows = [
        _row("a", "ce.kd.pgd", 0.80, 0.50, 0.40),
        _row("b", "ce.kd.pgd", 0.70, 0.30, 0.45),  # pgd20 > fgsm: worst case is fgsm
        _row("c", "ce.kd.pgd", 0.60, 0.60, 0.20),
        _row("rep", "ce.kd.pgd", 0.99, 0.99, 0.99, repeat=1),
        _row("short", "ce.kd.pgd", 0.99, 0.99, 0.99, epochs=1),
        _row("live", "ce.kd.pgd", 0.99, 0.99, 0.99, status="RUNNING"),
        _row("m", "mse.kd.pgd", 0.50, 0.25, math.nan),
    ]
    df = pd.DataFrame(rows)
    for c in ("repeat", "epochs_trained"):
        df[c] = pd.array(df[c], dtype="Int64")
    return df


def _best(cell, run, mean):
    std = dict.fromkeys(mean, math.nan)
    return Best(cell, run, f"{cell}#{run}", run, (0.5,), 1, "-", mean, std)


def test_cell_fronts_plot_the_full_budget_tuned_trials_and_the_best(spec, table, tmp_path):
    best = {
        "ce.kd.pgd": _best("ce.kd.pgd", "c", {"test/clean_acc": 0.6, FGSM: 0.6, PGD: 0.2}),
        "mse.kd.pgd": _best("mse.kd.pgd", "rep-only", {"test/clean_acc": 0.5, FGSM: 0.25}),
    }
    fronts = cell_front_points(spec, table, best)
    assert list(fronts) == ["ce.kd.pgd", "mse.kd.pgd"]  # grid order; no ard panel
    ce = fronts["ce.kd.pgd"]
    got = {run: (x, y) for x, y, run in ce.points}
    assert got == pytest.approx({"a": (80, 40), "b": (70, 30), "c": (60, 20)})
    assert ce.front == pytest.approx([(80, 40)])  # a beats b and c on both axes
    assert ce.best == pytest.approx((60, 20)) and ce.partial == 0  # chosen on val: c
    mse = fronts["mse.kd.pgd"]
    assert mse.points == [(50, 25, "m")] and mse.partial == 1
    assert mse.best is None  # its best run is not a full-budget tuned trial
    _assert_png(plot_cell_fronts(spec, table, best, tmp_path / "fronts.png"))
    _assert_png(plot_pareto(spec, best, tmp_path / "pareto.png"))
    _assert_png(plot_cell_fronts(spec, table.iloc[0:0], {}, tmp_path / "empty.png"))


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    assert matplotlib.image.imread(path)[..., :3].std() > 0.01, f"{path} is blank"
