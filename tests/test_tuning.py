"""Tuning that tunes: samplers sized to the budget, paired draws across the teacher axis, warm
start from sibling cells, and several objectives chosen by a declared rule. Real Optuna studies
in SQLite through CellSearcher; no sweep is run here (test_multiobjective.py runs one)."""

from __future__ import annotations

import optuna
import pytest
from conftest import tiny_spec_dict

from sweep.samplers import PairedStart, budget_warnings, make_sampler
from sweep.search import ASHA_SCORE, CellASHA, CellSearcher
from sweep.selection import Candidate, Rule, front, rank
from sweep.spec import ChooseSpec, Objective, SpecError, parse_spec

TWO = [{"metric": "val/clean_acc"}, {"metric": "val/robust_acc"}]


def _spec(tmp_path, **over):
    return parse_spec(tiny_spec_dict(tmp_path, **over))


def _searcher(tmp_path, **over):
    spec = _spec(tmp_path, **over)
    return spec, CellSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")


def _inner(spec, position=0):
    cell = spec.cells()[position]
    s = make_sampler(spec, cell, position)
    assert isinstance(s, PairedStart)
    return s


def test_default_sampler_models_after_a_third_of_the_budget_and_lies_about_running_trials(
    tmp_path,
):
    spec = _spec(tmp_path, budget={"trials_per_cell": 9, "epochs": 2, "grace_period": 2})
    s = _inner(spec)
    assert isinstance(s.inner, optuna.samplers.TPESampler)
    assert s.startup == 3 and s.inner._n_startup_trials == 3
    assert s.inner._constant_liar
    one_at_a_time = _spec(tmp_path, resources={"cpus_per_trial": 1, "max_concurrent_trials": 1})
    assert not _inner(one_at_a_time).inner._constant_liar
    small = _spec(tmp_path, budget={"trials_per_cell": 2, "epochs": 2, "grace_period": 2})
    assert _inner(small).startup == 1  # at least one, never the whole budget of 2


def test_auto_is_gp_from_16_trials_a_cell_and_several_objectives_get_tpe_not_nsga2(tmp_path):
    sixteen = {"trials_per_cell": 16, "epochs": 2, "early_stopping": False}
    assert isinstance(_inner(_spec(tmp_path, budget=sixteen)).inner, optuna.samplers.GPSampler)
    for budget in ({"epochs": 2, "early_stopping": False}, sixteen):
        spec = _spec(tmp_path, objective=TWO, budget=budget)
        assert isinstance(_inner(spec).inner, optuna.samplers.TPESampler)
    gp = _spec(tmp_path, optuna={"sampler": "gp"})
    assert isinstance(_inner(gp).inner, optuna.samplers.GPSampler)
    rnd = _spec(tmp_path, optuna={"sampler": "random"})
    assert isinstance(_inner(rnd).inner, optuna.samplers.RandomSampler)


def test_validate_warns_when_the_budget_leaves_the_sampler_no_modelled_trial(tmp_path):
    assert budget_warnings(_spec(tmp_path)) == []
    none_left = _spec(tmp_path, optuna={"n_startup_trials": 2})  # 2 trials a cell
    (w,) = budget_warnings(none_left)
    assert "every trial is a random draw" in w and "trials_per_cell" in w
    assert budget_warnings(_spec(tmp_path, optuna={"sampler": "random"})) == []


def _by_cell(configs):
    out = {}
    for c in configs:
        out.setdefault(c["cell"], {})[c["number"]] = c["hp"]
    return out


def test_cells_differing_only_in_teacher_loss_draw_the_same_random_phase_hyperparameters(
    tmp_path,
):
    """Trial k of ce.kd.pgd and mse.kd.pgd: the same temperature and alpha, whatever order
    the trials were asked in; cells of another method draw their own."""
    over = dict(
        budget={"trials_per_cell": 6, "epochs": 2, "grace_period": 2},
        optuna={"n_startup_trials": 4},
        search_space={
            "temperature": {"type": "float", "low": 1.0, "high": 8.0},
            "alpha": {"type": "float", "low": 0.1, "high": 0.9},
            "lr": {"type": "log_float", "low": 0.001, "high": 0.3},
        },
    )
    spec, s = _searcher(tmp_path, **over)
    got = _by_cell([s.suggest(f"t{i}") for i in range(4 * 4)])  # 4 cells, trials 0-3
    kd_ce, kd_mse = got["ce.kd.pgd"], got["mse.kd.pgd"]
    assert all(kd_ce[k] == kd_mse[k] for k in range(4))
    assert len({kd_ce[k]["lr"] for k in range(4)}) == 4  # draws, not one point
    assert all(got["ce.ard.pgd"][k]["lr"] != kd_ce[k]["lr"] for k in range(1, 4))
    # asked in another order (the other cells first), in a fresh storage: the same draws
    other = tmp_path / "other"
    other.mkdir()
    spec2 = parse_spec(tiny_spec_dict(other, **over))
    s2 = CellSearcher(spec2, f"sqlite:///{other / 'optuna.db'}")
    s2.next_cell = 3
    again = _by_cell([s2.suggest(f"u{i}") for i in range(16)])
    assert again["mse.kd.pgd"] == kd_mse and again["ce.kd.pgd"] == kd_ce
    # paired: false keeps the draws reproducible but not shared
    third = tmp_path / "unpaired"
    third.mkdir()
    spec3 = parse_spec(
        tiny_spec_dict(third, **{**over, "optuna": {"n_startup_trials": 4, "paired": False}})
    )
    s3 = CellSearcher(spec3, f"sqlite:///{third / 'optuna.db'}")
    un = _by_cell([s3.suggest(f"v{i}") for i in range(16)])
    assert all(un["ce.kd.pgd"][k] != un["mse.kd.pgd"][k] for k in range(1, 4))


def test_a_sibling_cells_best_is_offered_once_to_a_cell_still_tuning(tmp_path):
    over = dict(
        grid={"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["pgd"]},
        budget={"trials_per_cell": 6, "epochs": 2, "grace_period": 2},
    )
    spec, s = _searcher(tmp_path, **over)
    ce, mse = "ce.kd.pgd", "mse.kd.pgd"
    tid = iter(range(100))

    def ask(n):
        return [(f"t{next(tid)}", None) for _ in range(n)]

    def run(n):
        out = []
        for t, _ in ask(n):
            out.append((t, s.suggest(t)))
        return out

    def finish(pairs, cell, value):
        for t, c in pairs:
            if c["cell"] == cell:
                s.on_trial_complete(t, {"epoch": 2, "val/robust_acc": value})
                return c

    first = run(4)  # trials 0 and 1 of each cell: the paired random phase
    finish(first, ce, 0.2)
    finish([p for p in first if p[1]["number"] == 1], ce, 0.3)
    second = run(2)  # trial 2 of each: ce's best so far ran in mse too (paired): no offer
    assert all("warm_start_from" not in t.user_attrs for t in s.study(mse).trials)
    best_ce = finish(second, ce, 0.9)["hp"]  # ce's modelled trial 2 is its best
    third = run(2)
    got = next(c for _, c in third if c["cell"] == mse)
    assert got["number"] == 3 and got["hp"] == best_ce
    assert s.study(mse).trials[3].user_attrs == {"warm_start_from": f"{ce}#2"}
    more = [c for _, c in run(2)]  # not offered twice
    assert not any(c["hp"] == best_ce for c in more if c["cell"] == mse)
    # the ce cell has no finished sibling trial: nothing offered to it
    assert all("warm_start_from" not in t.user_attrs for t in s.study(ce).trials)

    (tmp_path / "off").mkdir()
    _, s_off = _searcher(tmp_path / "off", **over, optuna={"warm_start": False})
    cfgs = [s_off.suggest(f"t{i}") for i in range(4)]
    for i, c in enumerate(cfgs):
        if c["cell"] == ce:
            s_off.on_trial_complete(f"t{i}", {"epoch": 2, "val/robust_acc": 0.5})
    [s_off.suggest(f"n{i}") for i in range(2)]
    assert all("warm_start_from" not in t.user_attrs for t in s_off.study(mse).trials)


def test_with_several_objectives_a_stopped_trial_is_told_its_values_and_is_never_full(tmp_path):
    weights = {"val/clean_acc": 0.5, "val/robust_acc": 0.5}
    spec, s = _searcher(
        tmp_path,
        objective=TWO,
        grid={"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd"]},
        budget={"trials_per_cell": 2, "epochs": 4, "asha_weights": weights},
    )
    a, _ = s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"epoch": 1, "val/clean_acc": 0.95, "val/robust_acc": 0.9})
    ta = s.study(a["cell"]).trials[0]
    assert ta.state == optuna.trial.TrialState.COMPLETE and ta.values == [0.95, 0.9]
    assert ta.user_attrs["epochs_trained"] == 1  # the sampler learns from it ...
    assert s.best_trial(a["cell"]).number == 0  # (the cell's only finished trial)
    s.on_trial_complete("b", {"epoch": 4, "val/clean_acc": 0.6, "val/robust_acc": 0.3})
    assert s.best_trial(a["cell"]).number == 1  # ... but a full-budget trial is chosen over it


def test_several_objectives_without_a_declared_asha_scalarisation_are_refused(tmp_path):
    with pytest.raises(SpecError) as e:
        _spec(tmp_path, objective=TWO, budget={"epochs": 4, "grace_period": 1})
    assert "asha_weights" in str(e.value) and "early_stopping: false" in str(e.value)
    _spec(tmp_path, objective=TWO, budget={"epochs": 4, "early_stopping": False})
    with pytest.raises(SpecError, match="not an objective"):
        _spec(tmp_path, objective=TWO, budget={"epochs": 4, "asha_weights": {"val/loss": 1}})
    with pytest.raises(SpecError, match="with one objective"):
        _spec(tmp_path, choose={"rule": "knee"})
    with pytest.raises(SpecError, match="needs a bound"):
        _spec(
            tmp_path,
            objective=TWO,
            budget={"epochs": 4, "early_stopping": False},
            choose={"rule": "constrained", "maximize": "val/robust_acc"},
        )


class _Trial:
    """What CellASHA reads of a Tune trial: its id and config."""

    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config
        self.status = "RUNNING"


def _asha_decisions(tmp_path, objective, **budget):
    spec, s = _searcher(
        tmp_path,
        objective=objective,
        budget={"trials_per_cell": 3, "epochs": 9, "grace_period": 1, **budget},
        grid={"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd"]},
    )
    asha = CellASHA(spec)
    trials = [_Trial(f"t{i}", s.suggest(f"t{i}")) for i in range(3)]
    for t in trials:
        asha.on_trial_add(None, t)
    results = [(0.95, 0.10), (0.70, 0.50), (0.60, 0.55)]  # the clean-best is robust-worst
    out = []
    for t, (clean, robust) in zip(trials, results, strict=True):
        r = {"epoch": 1, "val/clean_acc": clean, "val/robust_acc": robust}
        out.append(asha.on_trial_result(None, t, r))
    return asha, out


def test_asha_ranks_several_objectives_by_the_declared_weighted_sum_not_the_first(tmp_path):
    """The first rung (epoch 1 of 9, reduction 3): ranked by clean accuracy alone, the later
    trials are stopped; by the declared sum (0.27, 0.54, 0.56) they are the better ones."""
    (tmp_path / "one").mkdir()
    _, by_clean = _asha_decisions(tmp_path / "one", {"metric": "val/clean_acc"})
    assert by_clean == ["CONTINUE", "STOP", "STOP"]
    weights = {"val/clean_acc": 0.2, "val/robust_acc": 0.8}
    asha, by_sum = _asha_decisions(tmp_path, TWO, asha_weights=weights)
    assert asha._kw["metric"] == ASHA_SCORE
    assert by_sum == ["CONTINUE", "CONTINUE", "CONTINUE"]
    scored = asha.scored({"val/clean_acc": 0.6, "val/robust_acc": 0.55})
    assert scored[ASHA_SCORE] == pytest.approx(0.2 * 0.6 + 0.8 * 0.55)


def _c(config, values, full=True):
    return Candidate(config, int(config), 0, tuple(values), full)


MAX2 = (Objective(metric="val/clean_acc"), Objective(metric="val/robust_acc"))


def test_knee_picks_the_front_point_nearest_the_ideal_and_front_is_the_non_dominated_set():
    rule = Rule(MAX2, ChooseSpec(rule="knee"))
    cands = [
        _c("0", (0.95, 0.10)),  # front, an extreme
        _c("1", (0.80, 0.45)),  # front, the knee
        _c("2", (0.60, 0.50)),  # front, the other extreme
        _c("3", (0.70, 0.40)),  # dominated by 1
    ]
    ranked = rank(cands, rule)
    assert ranked[0].config == "1" and ranked[-1].config == "3"
    assert sorted(r.config for r in front(ranked, rule)) == ["0", "1", "2"]


def test_constrained_picks_the_most_robust_meeting_the_clean_bound_else_the_nearest_miss():
    rule = Rule(
        MAX2,
        ChooseSpec(rule="constrained", maximize="val/robust_acc", at_least={"val/clean_acc": 0.75}),
    )
    cands = [_c("0", (0.95, 0.10)), _c("1", (0.80, 0.45)), _c("2", (0.60, 0.50))]
    assert [r.config for r in rank(cands, rule)] == ["1", "0", "2"]
    # none meets the bound: the one nearest to it first
    miss = [_c("0", (0.70, 0.30)), _c("1", (0.60, 0.50))]
    assert rank(miss, rule)[0].config == "0"
    # min objectives are handled by their mode
    with_loss = Rule(
        (Objective(metric="val/loss", mode="min"), Objective(metric="val/robust_acc")),
        ChooseSpec(rule="constrained", minimize="val/loss", at_least={"val/robust_acc": 0.4}),
    )
    pts = [_c("0", (0.5, 0.45)), _c("1", (0.3, 0.41)), _c("2", (0.1, 0.2))]
    assert rank(pts, with_loss)[0].config == "1"


def test_the_progress_display_shows_every_objective_and_the_rules_best():
    import io

    from sweep.console import DONE, SweepConsole

    rule = Rule(MAX2, ChooseSpec(rule="knee"))
    out = io.StringIO()
    c = SweepConsole(["a"], per_cell=4, total=4, objective=rule, epochs=2, stream=out, live=False)
    for i, v in enumerate([(0.95, 0.10), (0.80, 0.45), (0.60, 0.50), (0.70, 0.40)]):
        line = c.trial_ended(f"t{i}", "a", f"a#{i}", DONE, value=v, epoch=2, number=i)
    assert "val/clean_acc=0.7000, val/robust_acc=0.4000" in line
    assert c.best_scores("a") == (0.80, 0.45)  # the knee, not the best clean accuracy
    assert "best 0.8000/0.4500" in c.cell_text("a")
