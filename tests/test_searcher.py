"""CellSearcher: one Optuna study per cell, filled exactly, results routed to the owning cell."""

from __future__ import annotations

import optuna
from conftest import tiny_spec_dict, trial_config
from ray.tune.search import Searcher

from sweep.search import CellSearcher
from sweep.spec import parse_spec


def _searcher(tmp_path, **over):
    spec = parse_spec(tiny_spec_dict(tmp_path, **over))
    return spec, CellSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")


def test_fills_every_cell_round_robin_then_finishes(tmp_path):
    spec, s = _searcher(tmp_path)
    configs = [s.suggest(f"t{i}") for i in range(8)]
    assert s.suggest("t8") == Searcher.FINISHED
    cells = [c["cell"] for c in configs]
    assert cells[:4] == [c.key for c in spec.cells()] == cells[4:]
    assert sorted(c["number"] for c in configs) == [0] * 4 + [1] * 4
    for c in configs:
        assert 1.0 <= c["hp"]["temperature"] <= 4.0 and 0.2 <= c["hp"]["alpha"] <= 0.8
        assert c["seed"] == spec.seed + c["number"]


def test_results_reach_the_owning_study_complete_pruned_or_failed(tmp_path):
    spec, s = _searcher(tmp_path)
    a, b, c = (s.suggest(t) for t in ("a", "b", "c"))
    s.on_trial_result("a", {"epoch": 1, "val/robust_acc": 0.3})
    s.on_trial_complete("a", {"epoch": 2, "val/robust_acc": 0.5})
    s.on_trial_complete("b", {"epoch": 1, "val/robust_acc": 0.1})  # stopped early by ASHA
    s.on_trial_complete("c", None, error=True)
    storage = optuna.storages.RDBStorage(s.optuna_url)

    def only_trial(cfg):
        (t,) = optuna.load_study(study_name=f"tiny/{cfg['cell']}", storage=storage).trials
        return t

    ta, tb, tc = only_trial(a), only_trial(b), only_trial(c)
    assert ta.state == optuna.trial.TrialState.COMPLETE and ta.value == 0.5
    assert ta.intermediate_values == {1: 0.3}
    assert ta.params == {k: a["hp"][k] for k in ("temperature", "alpha")}
    assert tb.state == optuna.trial.TrialState.PRUNED
    assert tc.state == optuna.trial.TrialState.FAIL


def test_multi_objective_tells_every_value(tmp_path):
    objectives = [{"metric": "val/clean_acc"}, {"metric": "val/robust_acc"}]
    spec, s = _searcher(tmp_path, objective=objectives)
    cfg = s.suggest("a")
    s.on_trial_complete("a", {"epoch": 2, "val/clean_acc": 0.9, "val/robust_acc": 0.4})
    study = optuna.load_study(study_name=f"tiny/{cfg['cell']}", storage=s.optuna_url)
    assert study.trials[0].values == [0.9, 0.4]


def test_searcher_survives_pickling_without_its_database_handles(tmp_path):
    import pickle

    _, s = _searcher(tmp_path)
    s.suggest("a")
    again = pickle.loads(pickle.dumps(s))
    assert again.handed == s.handed and again.live == s.live
    assert again.suggest("b")["cell"] != s.live["a"][0]


def _restored(tmp_path, s, snapshot):
    spec = parse_spec(tiny_spec_dict(tmp_path))
    again = CellSearcher(spec, s.optuna_url)
    again.restore(str(snapshot))
    return again


def test_after_a_restore_trials_asked_since_the_snapshot_are_handed_out_again_not_reasked(
    tmp_path,
):
    """The driver snapshots, asks two more trials, and dies. The restored searcher hands those
    two out again (same cell, index, parameters), then asks new ones: Optuna ends with exactly
    the budget and nothing stays RUNNING once Tune reports back."""
    spec, s = _searcher(tmp_path)
    first = [s.suggest(f"t{i}") for i in range(3)]
    s.save(str(tmp_path / "snap.pkl"))
    lost = [s.suggest(f"t{i}") for i in range(3, 5)]  # never reached Tune's snapshot
    s.on_trial_complete("t3", {"epoch": 2, "val/robust_acc": 0.4})  # finished before the kill

    again = _restored(tmp_path, s, tmp_path / "snap.pkl")
    handed = [again.suggest(f"n{i}") for i in range(2)]
    strip = lambda c: {k: v for k, v in c.items() if k != "trial_id"}  # noqa: E731
    assert [strip(c) for c in handed] == [strip(c) for c in lost]
    rest = [again.suggest(f"m{i}") for i in range(3)]
    assert again.suggest("done") == Searcher.FINISHED
    keys = [(c["cell"], c["number"]) for c in first + handed + rest]
    assert len(keys) == len(set(keys)) == 8

    for i in range(len(handed + rest)):  # Tune reports every trial, t3 a second time
        again.on_trial_complete(
            ["n0", "n1", "m0", "m1", "m2"][i], {"epoch": 2, "val/robust_acc": 0.1 * i}
        )
    storage = optuna.storages.RDBStorage(s.optuna_url)
    trials = [
        t
        for cell in spec.cells()
        for t in optuna.load_study(study_name=f"tiny/{cell.key}", storage=storage).trials
    ]
    assert len(trials) == 8
    lost_keys = {(c["cell"], c["number"]) for c in lost}
    states = {
        (cell.key, t.number): t
        for cell in spec.cells()
        for t in optuna.load_study(study_name=f"tiny/{cell.key}", storage=storage).trials
    }
    t3 = states[(lost[0]["cell"], lost[0]["number"])]
    assert t3.value == 0.4  # the verdict told before the kill stands
    assert all(states[k].state != optuna.trial.TrialState.RUNNING for k in lost_keys)
    running = [k for k, t in states.items() if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 3  # only `first`, whose reports the restored Tune still owes


def _tell(s, trial_id, value, epoch=2):
    s.on_trial_complete(trial_id, {"epoch": epoch, "val/robust_acc": value})


def test_repeats_wait_for_the_cell_then_rerun_its_best_with_new_seeds(tmp_path):
    """`repeats: 2`: nothing is repeated while a cell tunes; then its best COMPLETE trial (an
    early-stopped trial with a higher value is not eligible) is handed out twice with seeds no
    tuning trial used; repeats are not Optuna trials; a cell whose trials all failed gets
    none, and the searcher finishes once every cell is settled."""
    spec, s = _searcher(tmp_path, repeats=2)
    tuned = {f"t{i}": s.suggest(f"t{i}") for i in range(8)}
    assert s.suggest("early") is None  # every cell still tunes: wait, do not finish
    by_cell: dict[str, list[str]] = {}
    for tid, c in tuned.items():
        by_cell.setdefault(c["cell"], []).append(tid)
    first, second, *_ = [c.key for c in spec.cells()]
    a0, a1 = by_cell[first]
    _tell(s, a0, 0.9, epoch=1)  # stopped by ASHA: PRUNED, its value is from epoch 1
    assert s.suggest("x") is None  # first cell has one trial still running
    _tell(s, a1, 0.5)
    r1, r2 = s.suggest("r1"), s.suggest("r2")
    assert s.suggest("y") is None  # the other cells still tune
    best = tuned[a1]
    for k, r in enumerate((r1, r2), start=1):
        assert r["cell"] == first and r["repeat"] == k
        assert r["number"] == best["number"] and r["hp"] == best["hp"]
        assert r["seed"] == spec.seed + spec.budget.trials_per_cell + k - 1
    tuning_seeds = {c["seed"] for c in tuned.values()}
    assert not tuning_seeds & {r1["seed"], r2["seed"]}

    _tell(s, "r1", 0.1)  # a repeat's result is not told to Optuna
    study = optuna.load_study(study_name=f"tiny/{first}", storage=s.optuna_url)
    assert len(study.trials) == 2

    for tid in by_cell[second]:  # all failed: no best to repeat
        s.on_trial_complete(tid, None, error=True)
    rest = [c for c in spec.cells() if c.key not in (first, second)]
    for cell in rest:
        for i, tid in enumerate(by_cell[cell.key]):
            _tell(s, tid, 0.2 + 0.1 * i)
    handed = [s.suggest(f"r{i}") for i in range(3, 3 + 2 * len(rest))]
    assert sorted((c["cell"], c["repeat"]) for c in handed) == sorted(
        (c.key, k) for c in rest for k in (1, 2)
    )
    for c in handed:  # ties aside, the higher value wins: index of the 0.3 trial
        assert tuned[by_cell[c["cell"]][1]]["number"] == c["number"]
    assert s.suggest("end") == Searcher.FINISHED


def test_repeats_handed_out_after_the_snapshot_come_back_with_the_same_identity(tmp_path):
    """The driver snapshots after repeat 1 and dies after handing out repeat 2: the restored
    searcher hands out repeat 2 again (same cell, index, seed: it finds its checkpoint and
    run), and no third repeat."""
    spec, s = _searcher(tmp_path, repeats=2)
    for i in range(8):
        s.suggest(f"t{i}")
    for i in range(8):
        _tell(s, f"t{i}", 0.1 * i)
    r1 = s.suggest("r1")
    s.save(str(tmp_path / "snap.pkl"))
    lost = s.suggest("r2")
    again = CellSearcher(parse_spec(tiny_spec_dict(tmp_path, repeats=2)), s.optuna_url)
    again.restore(str(tmp_path / "snap.pkl"))
    back = again.suggest("n1")
    strip = lambda c: {k: v for k, v in c.items() if k != "trial_id"}  # noqa: E731
    assert strip(back) == strip(lost) and back["repeat"] == 2 and r1["repeat"] == 1
    later = [again.suggest(f"m{i}") for i in range(6)]
    assert {(c["cell"], c["repeat"]) for c in later} == {
        (c.key, k) for c in spec.cells()[1:] for k in (1, 2)
    } and again.suggest("end") == Searcher.FINISHED


def test_a_repeat_has_its_own_checkpoint_folder_inside_its_configuration():
    from dataclasses import replace

    tuned = trial_config("mcmi(lambda=0.1).kd.pgd", number=3)
    again = replace(tuned, repeat=2)
    folder = tuned.config_key.split("/")[0]  # readable part, then a hash (test_security.py)
    assert folder.startswith("mcmi_lambda=0.1_.kd.pgd-")
    assert tuned.config_key == again.config_key == f"{folder}/3"
    assert tuned.key == f"{folder}/3"
    assert again.key == f"{folder}/3/repeat-2"
    assert tuned.label == "mcmi(lambda=0.1).kd.pgd#3"
    assert again.label == "mcmi(lambda=0.1).kd.pgd#3.r2"


def test_a_trial_config_is_a_dict_only_at_tunes_boundary(tmp_path):
    """What the searcher hands Tune comes back as the same TrialConfig; a config Tune stored
    before `number` was named (`cell_index`) is read with the same identity."""
    from sweep.config import TrialConfig

    _, s = _searcher(tmp_path)
    handed = s.suggest("t0")
    config = TrialConfig.from_dict(handed)
    assert config.to_dict() == handed and config.trial_id == "t0"
    old = {k: v for k, v in handed.items() if k != "number"} | {"cell_index": config.number}
    assert TrialConfig.from_dict(old) == config


def test_each_cells_first_trial_runs_the_papers_setting_then_tuning_starts(tmp_path, monkeypatch):
    from sweep.methods import METHODS

    # KD's declared setting, here one in the file's range and one outside it
    monkeypatch.setattr(METHODS.get("kd"), "paper_default", {"temperature": 3.0, "alpha": 0.9})
    spec, s = _searcher(tmp_path)
    params, notes = spec.paper_start("kd")
    assert params == {"temperature": 3.0} and "alpha=0.9 is outside the range" in notes[0]
    configs = [s.suggest(f"t{i}") for i in range(8)]
    kd = [c for c in configs if c["method"] == "kd"]
    firsts = [c for c in kd if c["number"] == 0]
    assert len(firsts) == 2 and all(c["hp"]["temperature"] == 3.0 for c in firsts)
    assert all(0.2 <= c["hp"]["alpha"] <= 0.8 for c in firsts)  # sampled, in range
    assert not any(c["hp"]["temperature"] == 3.0 for c in kd if c["number"] == 1)
    study = optuna.load_study(study_name=f"tiny/{firsts[0]['cell']}", storage=s.optuna_url)
    assert study.trials[0].user_attrs == {"paper_default": True}
    # a restored searcher does not enqueue it again nor hand out the asked trial twice
    import pickle

    again = pickle.loads(pickle.dumps(s))
    assert again.reconcile() == []
    assert len(again.study(firsts[0]["cell"]).trials) == 2
