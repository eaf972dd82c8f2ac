"""The teacher-loss comparison: paired gains over the `ce` teacher with bootstrap CIs
(report/stats.py, report/gains.py) and how summary.md shows them.

Fast: no sweep is run. A parsed tiny spec (ce and mse teachers, kd, pgd, repeats 3) and a
trials table built by hand with the columns trials_table makes; expected gains are computed
here from the rows that should pair, never read back from the code under test.
"""

from __future__ import annotations

import itertools
import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_spec_dict

from sweep.report.data import SweepData
from sweep.report.footnotes import footnotes
from sweep.report.gains import (
    COLUMNS,
    comparisons,
    gain_gaps,
    plot_gains,
    seed_pairs,
    teacher_gains,
    trial_pairs,
    write_gains,
)
from sweep.report.markdown import missing_lines, summary_markdown
from sweep.report.stats import MIN_PAIRS, paired_bootstrap
from sweep.report.table import FIXED_COLUMNS, INT_COLUMNS, Best
from sweep.spec import parse_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CE, MSE = "ce.kd.pgd", "mse.kd.pgd"
METRICS = ["test/clean_acc", "test/robust_acc/fgsm", "test/robust_acc/pgd20"]
EPOCHS = 2


# --- the bootstrap ------------------------------------------------------------------------------
def _exact_resample_means(diffs: list[float]) -> np.ndarray:
    """The mean of every one of the n^n equally likely resamples with replacement."""
    return np.array([np.mean(r) for r in itertools.product(diffs, repeat=len(diffs))])


@pytest.mark.parametrize(
    "diffs", [[1.0, -2.0, 4.0], [0.5, -1.0, 2.0, 3.5], [0.5, -1.0, 2.0, 3.5, -0.25, 1.3]]
)
def test_interval_matches_the_exact_bootstrap_distribution(diffs):
    """Monte-Carlo tolerance: a percentile of n_boot draws sits where the draws' empirical CDF
    reaches p; that CDF is within 5 binomial standard deviations sqrt(p(1-p)/n_boot) of the
    exact one except with probability ~1e-6, so the estimate lies between the exact
    distribution's quantiles at p -/+ 5 sd (inclusive: the distribution is discrete).
    Six values (46,656 resamples) as well: with 3 or 4 the distribution has so few atoms
    that a wrong level (90%, or 97.5% per tail) lands on the same ones; with 6 it does not."""
    n_boot, level = 10000, 0.95
    iv = paired_bootstrap(diffs, n_boot=n_boot, level=level, seed=0)
    exact = _exact_resample_means(diffs)
    assert iv.n == len(diffs) and iv.mean == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
    for p, got in (((1 - level) / 2, iv.low), ((1 + level) / 2, iv.high)):
        tol = 5 * math.sqrt(p * (1 - p) / n_boot)
        lo = np.quantile(exact, max(p - tol, 0), method="lower")
        hi = np.quantile(exact, min(p + tol, 1), method="higher")
        assert hi - lo < (exact.max() - exact.min()) / 2  # the window can miss
        assert lo <= got <= hi, (p, got, lo, hi)
    assert iv.low < iv.mean < iv.high


def test_interval_is_deterministic_and_absent_below_min_pairs():
    d = [0.3, -0.1, 0.8, 0.2, 0.5]
    assert paired_bootstrap(d) == paired_bootstrap(list(d))
    two = paired_bootstrap([1.0, 2.0])
    assert MIN_PAIRS == 3 and two.n == 2 and two.mean == 1.5
    assert math.isnan(two.low) and math.isnan(two.high) and not two.has_ci
    none = paired_bootstrap([])
    assert none.n == 0 and math.isnan(none.mean)
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1.0, math.nan, 2.0])


# --- a hand-made sweep --------------------------------------------------------------------------
@pytest.fixture
def spec(tmp_path):
    grid = {"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["pgd"]}
    budget = {"trials_per_cell": 7, "epochs": EPOCHS, "grace_period": 1}
    return parse_spec(tiny_spec_dict(tmp_path, grid=grid, budget=budget, repeats=3))


def _row(cell: str, trial: int, hp: tuple[float, float], acc: float, **over) -> dict:
    """One student run: test accuracies acc, acc - 0.2, acc - 0.3 (clean, fgsm, pgd20)."""
    teacher, method, attack = cell.split(".")
    row = {
        "run_id": f"{cell}#{trial}/{over.get('repeat', 0)}",
        "run_name": f"{cell}#{trial}",
        "status": "FINISHED",
        "cell": cell,
        "teacher_loss": teacher,
        "method": method,
        "train_attack": attack,
        "optuna_trial": trial,
        "seed": trial,
        "epochs_trained": EPOCHS,
        "config": f"{cell}/{trial}",
        "repeat": None,
        "param.temperature": hp[0],
        "param.alpha": hp[1],
        METRICS[0]: acc,
        METRICS[1]: acc - 0.2,
        METRICS[2]: acc - 0.3,
    }
    return row | over


# Tuning trials by number: (ce's (T, alpha), mse's (T, alpha), what differs). Pairs: 0, 1, 5.
SAME, OTHER = (2.0, 0.5), (3.0, 0.25)
TRIALS = {
    0: (SAME, SAME, None),  # the paper setting: identical
    1: ((3.1, 0.3), (3.1, 0.3), None),  # random phase: identical, both cells' best
    2: ((1.5, 0.7), (1.5, 0.7), "ce stopped early"),
    3: (SAME, OTHER, "different params"),
    4: ((1.2, 0.6), (1.2, 0.6), "ce FAILED"),
    5: ((2.5, 0.4), (2.5, 0.4), None),
    6: ((1.8, 0.45), (1.8, 0.45), "different seeds"),  # a spec changed between the runs
}
PAIRED = [0, 1, 5]
CE_ACC = {0: 0.61, 1: 0.70, 2: 0.55, 3: 0.58, 4: 0.40, 5: 0.66, 6: 0.30}
MSE_ACC = {0: 0.64, 1: 0.69, 2: 0.60, 3: 0.50, 4: 0.62, 5: 0.71, 6: 0.80}
REPEAT_ACC = {CE: [0.68, 0.71, 0.69], MSE: [0.72, 0.70, 0.74]}  # repeats k = 1, 2, 3


def _table(spec, rows: list[dict]) -> pd.DataFrame:
    """Rows typed as trials_table types them."""
    df = pd.DataFrame(rows)
    for c in FIXED_COLUMNS:
        if c not in df:
            df[c] = None
    for c in INT_COLUMNS:
        df[c] = pd.array(df[c], dtype="Int64")
    return df


def _best(df: pd.DataFrame) -> dict[str, Best]:
    """Each cell's best configuration, by hand (tuned trial 1 in both, when it finished): the
    choice is selection.py's business, tested there; here only `config` is read."""
    out = {}
    for cell in (CE, MSE):
        if ((df["cell"] == cell) & (df["status"] == "FINISHED")).any():
            none = dict.fromkeys(METRICS, math.nan)  # the best table's numbers: not tested here
            out[cell] = Best(cell, f"{cell}/1", f"{cell}#1", "id", (0.9,), 4, "-", none, none)
    return out


def _sweep_rows(spec, *, mse_repeat3: str = "FINISHED") -> list[dict]:
    rows = []
    for k, (ce_hp, mse_hp, why) in TRIALS.items():
        ce = _row(CE, k, ce_hp, CE_ACC[k])
        if why == "ce stopped early":
            ce["epochs_trained"] = EPOCHS - 1
        if why == "ce FAILED":
            ce["status"] = "FAILED"
        mse = _row(MSE, k, mse_hp, MSE_ACC[k])
        if why == "different seeds":
            mse["seed"] = k + 100
        rows += [ce, mse]
    for cell, hp in ((CE, TRIALS[1][0]), (MSE, TRIALS[1][1])):
        for k, acc in enumerate(REPEAT_ACC[cell], start=1):
            status = mse_repeat3 if (cell, k) == (MSE, 3) else "FINISHED"
            over = {"repeat": k, "seed": spec.repeat_seed(k), "config": f"{cell}/1"}
            rows.append(_row(cell, 1, hp, acc, status=status, **over))
    # a repeat of a configuration that is not the best one: never paired
    rows.append(_row(MSE, 0, SAME, 0.99, repeat=1, seed=spec.repeat_seed(1), config=f"{MSE}/0"))
    return rows


def _hand_diffs(pairs: list[tuple[float, float]], offset: float = 0.0) -> list[float]:
    """mse - ce in percentage points, for a metric `offset` below clean in both."""
    return [100 * ((m - offset) - (c - offset)) for c, m in pairs]


def test_trials_pair_only_identical_full_finished_trials(spec):
    df = _table(spec, _sweep_rows(spec))
    (comp,) = comparisons(spec)
    assert (comp.cell.key, comp.ref.key) == (MSE, CE)
    pairs = trial_pairs(spec, df, comp)
    assert sorted(int(t) for t in pairs["optuna_trial"]) == PAIRED
    gains = teacher_gains(spec, df, _best(df))
    row = gains[(gains["basis"] == "trials") & (gains["metric"] == METRICS[0])].iloc[0]
    expected = _hand_diffs([(CE_ACC[k], MSE_ACC[k]) for k in PAIRED])
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(expected))
    assert row["low"] < row["mean"] < row["high"]


def test_trials_are_not_paired_when_a_searched_param_was_never_logged(spec):
    df = _table(spec, _sweep_rows(spec)).drop(columns="param.alpha")
    assert trial_pairs(spec, df, comparisons(spec)[0]).empty
    gains = teacher_gains(spec, df, _best(df))
    assert (gains[gains["basis"] == "trials"]["n"] == 0).all()
    assert (gains[gains["basis"] == "seeds"]["n"] == 3).all()  # seeds do not need the params


def test_seeds_pair_by_repeat_index_of_the_best_configurations(spec):
    df = _table(spec, _sweep_rows(spec))
    shuffled = df.sample(frac=1.0, random_state=3).reset_index(drop=True)  # order is no key
    best = _best(shuffled)
    pairs = seed_pairs(shuffled, best, comparisons(spec)[0])
    assert sorted(int(k) for k in pairs["repeat"]) == [1, 2, 3]
    assert (pairs["seed_l"] == pairs["seed_ref"]).all()
    gains = teacher_gains(spec, shuffled, best)
    expected = _hand_diffs(list(zip(REPEAT_ACC[CE], REPEAT_ACC[MSE], strict=True)), 0.3)
    row = gains[(gains["basis"] == "seeds") & (gains["metric"] == METRICS[2])].iloc[0]
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(expected))
    assert list(gains.columns) == COLUMNS and len(gains) == len(METRICS) * 2


def test_an_unfinished_repeat_is_not_paired(spec):
    df = _table(spec, _sweep_rows(spec, mse_repeat3="RUNNING"))
    best = _best(df)
    pairs = seed_pairs(df, best, comparisons(spec)[0])
    assert sorted(int(k) for k in pairs["repeat"]) == [1, 2]


# --- summary.md, gains.csv, the heatmap -----------------------------------------------------------
def _summary(spec, df: pd.DataFrame) -> str:
    data = SweepData("gains", spec, {}, None, [], [])
    best = _best(df)
    return summary_markdown(data, df, best, missing_lines(data, df, best))


def _cols(summary: str, first: str) -> list[str]:
    line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_shows_the_gain_with_its_ci_on_both_bases(spec):
    s = _summary(spec, _table(spec, _sweep_rows(spec)))
    cols = _cols(s, "pgd")
    assert cols[1] == footnotes(spec).teacher("mse")
    seeds = paired_bootstrap(_hand_diffs(list(zip(REPEAT_ACC[CE], REPEAT_ACC[MSE], strict=True))))
    trials = paired_bootstrap(_hand_diffs([(CE_ACC[k], MSE_ACC[k]) for k in PAIRED]))
    for got, iv in ((cols[2], seeds), (cols[3], trials)):  # clean: seeds, then trials
        assert got == f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}] (n=3)"
    header = _cols(s, "train attack")
    assert header[2:4] == ["clean seeds", "clean trials"] and header[-1] == "pgd20 trials"
    assert "### Not yet conclusive" not in s  # three seed pairs: a CI on every metric


def test_fewer_than_three_seed_pairs_give_no_ci_and_say_what_is_missing(tmp_path):
    grid = {"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["pgd"]}
    budget = {"trials_per_cell": 7, "epochs": EPOCHS, "grace_period": 1}
    spec = parse_spec(tiny_spec_dict(tmp_path, grid=grid, budget=budget, repeats=2))
    rows = [r for r in _sweep_rows(spec) if (r["repeat"] or 0) < 3]
    s = _summary(spec, _table(spec, rows))
    diffs = _hand_diffs(list(zip(REPEAT_ACC[CE][:2], REPEAT_ACC[MSE][:2], strict=True)))
    assert _cols(s, "pgd")[2] == f"{np.mean(diffs):+.2f} (n=2, no CI)"
    gaps = s.split("### Not yet conclusive", 1)[1].split("\n## ", 1)[0]
    assert f"`{MSE}` vs `{CE}`: 2 seed pairs" in gaps
    assert f"`{MSE}` 2, `{CE}` 2 of `repeats: 2`" in gaps and "set `repeats: 3` or more" in gaps
    assert "the trials basis has 3 pairs" in gaps


def test_no_pairs_show_a_dash_and_a_missing_reference_is_named(spec):
    df = _table(spec, [r for r in _sweep_rows(spec) if r["cell"] == MSE])  # ce never ran
    s = _summary(spec, df)
    assert _cols(s, "pgd")[2:] == ["—"] * (2 * len(METRICS))
    assert f"`{CE}` has no finished trial yet: no comparison" in s
    gaps = s.split("### Not yet conclusive", 1)[1]
    assert f"`{MSE}` vs `{CE}`: 0 seed pairs" in gaps and f"`{CE}` has no finished trial" in gaps


def test_gains_csv_and_heatmap_are_written(spec, tmp_path):
    df = _table(spec, _sweep_rows(spec))
    gains = teacher_gains(spec, df, _best(df))
    csv = pd.read_csv(write_gains(gains, tmp_path))
    assert list(csv.columns) == COLUMNS and len(csv) == len(gains)
    assert csv["mean"].to_numpy() == pytest.approx(gains["mean"].to_numpy())
    path = plot_gains(gains, tmp_path / "gains.png", notes=footnotes(spec))
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    img = matplotlib.image.imread(path)
    assert img[..., :3].std() > 0.01  # panels and text were drawn
    empty = plot_gains(gains.iloc[0:0], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == PNG_SIGNATURE


def test_gaps_name_cells_without_a_ce_reference(tmp_path):
    grid = {"teacher_loss": ["mse"], "method": ["kd"], "train_attack": ["pgd"]}
    spec = parse_spec(tiny_spec_dict(tmp_path, grid=grid))
    df = _table(spec, [])
    gains = teacher_gains(spec, df, {})
    assert gains.empty and list(gains.columns) == COLUMNS
    (gap,) = gain_gaps(spec, df, {}, gains)
    assert "no `ce` teacher cell" in gap and f"`{MSE}`" in gap


def test_a_sweep_without_repeats_is_told_to_run_some(tmp_path):
    grid = {"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["pgd"]}
    budget = {"trials_per_cell": 7, "epochs": EPOCHS, "grace_period": 1}
    spec = parse_spec(tiny_spec_dict(tmp_path, grid=grid, budget=budget))
    df = _table(spec, [r for r in _sweep_rows(spec) if r["repeat"] is None])
    best = _best(df)
    (gap,) = gain_gaps(spec, df, best, teacher_gains(spec, df, best))
    assert "0 seed pairs" in gap and "no seed repeats (`repeats: 0`)" in gap
    assert "set `repeats: 3` or more" in gap and "the trials basis has 3 pairs." in gap
