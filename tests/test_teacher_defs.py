"""Teacher entries, parameter lists and teacher sets resolve to content-defined teachers."""

from __future__ import annotations

import pytest

from sweep.spec import Cell, parse_spec
from sweep.teacher_defs import MissingTeacher, TeacherSetsSpec, teacher_set
from sweep.teacher_losses import TEACHER_LOSSES
from sweep.teachers import teacher_hash, teacher_identity


def _spec(teacher_loss, method=("kd",), **over):
    data = {
        "name": "t",
        "seed": 3,
        "grid": {"teacher_loss": teacher_loss, "method": list(method), "train_attack": ["pgd"]},
        "threat": {"eps": 0.1},
    }
    data.update(over)
    return parse_spec(data)


def _hash(spec, t):
    return teacher_hash(teacher_identity(spec, t))


def test_a_list_of_values_means_one_teacher_and_one_cell_per_value():
    spec = _spec(["ce", {"name": "mcmi", "params": {"lambda": [0.05, 0.1]}}])
    variants = spec.teacher_variants()
    assert list(variants) == ["ce", "mcmi(lambda=0.05)", "mcmi(lambda=0.1)"]
    assert variants["mcmi(lambda=0.1)"].params_dict() == {"lambda": 0.1, "momentum": 0.9}
    assert [c.key for c in spec.cells()] == [
        "ce.kd.pgd",
        "mcmi(lambda=0.05).kd.pgd",
        "mcmi(lambda=0.1).kd.pgd",
    ]
    hashes = {_hash(spec, t) for t in variants.values()}
    assert len(hashes) == 3


def test_several_lists_give_every_combination():
    spec = _spec([{"name": "cmic", "params": {"lambda": [0.1, 0.2], "beta": [0.0, 0.01]}}])
    assert len(spec.teacher_variants()) == 4


def test_same_teacher_written_two_ways_is_one_cache_entry():
    a = _spec([{"name": "trades"}])
    b = _spec([{"name": "trades", "params": {"beta": 6.0, "eps": 0.1}, "label": "trades6"}])
    (ta,), (tb,) = a.teacher_variants().values(), b.teacher_variants().values()
    assert ta.params_dict()["eps"] == 0.1  # unset eps is the sweep's threat eps
    assert ta.label != tb.label and _hash(a, ta) == _hash(b, tb)


def test_what_defines_a_teacher_changes_its_hash():
    base = _spec(["ce"])
    (t,) = base.teacher_variants().values()
    h = _hash(base, t)
    for over in (
        {"teacher": {"arch": "resnet18"}},
        {"teacher": {"epochs": 3}},
        {"teacher": {"seed": 9}},
        {"dataset": {"split_seed": 1}},
        {"teacher": {"optim": {"lr": 0.01}}},
    ):
        other = _spec(["ce"], **over)
        (t2,) = other.teacher_variants().values()
        assert _hash(other, t2) != h, over
    # ... and what does not define it leaves it alone
    renamed = _spec(["ce"], budget={"epochs": 3}, storage={"path": "/elsewhere"})
    (t3,) = renamed.teacher_variants().values()
    assert _hash(renamed, t3) == h


def test_adversarial_teacher_eps_follows_the_threat_unless_given():
    spec = _spec([{"name": "pgd_at"}, {"name": "pgd_at", "params": {"eps": 0.2}}])
    eps = [t.params_dict()["eps"] for t in spec.teacher_variants().values()]
    assert eps == [0.1, 0.2]
    assert all(TEACHER_LOSSES.get(t.loss).adversarial for t in spec.teacher_variants().values())


def test_clean_plus_robust_set_is_the_cell_teacher_and_the_robust_one():
    spec = _spec(["mse"])
    (primary,) = spec.teacher_variants().values()
    d = spec.teacher_defaults()
    with pytest.raises(MissingTeacher, match="teacher_sets.robust"):  # the file must say how
        teacher_set("clean+robust", primary, spec.teacher_sets, d)
    sets = TeacherSetsSpec.model_validate({"robust": {"loss": "trades"}})
    clean, robust = teacher_set("clean+robust", primary, sets, d)
    assert clean == primary
    assert robust.loss == "trades" and robust.params_dict()["beta"] == 6.0
    assert robust.seed == primary.seed == 3
    sets = TeacherSetsSpec.model_validate({"robust": {"loss": "pgd_at", "seed": 11}})
    _, robust = teacher_set("clean+robust", primary, sets, d)
    assert (robust.loss, robust.seed, robust.params_dict()["eps"]) == ("pgd_at", 11, 0.1)


def test_ensemble_of_k_varies_seeds_or_follows_members():
    spec = _spec([{"name": "mcmi", "params": {"lambda": 0.2}}])
    (primary,) = spec.teacher_variants().values()
    d = spec.teacher_defaults()
    members = teacher_set("ensemble", primary, spec.teacher_sets, d)
    assert [m.seed for m in members] == [3, 4, 5]  # default K = 3, seeds s..s+2
    assert all(m.loss == "mcmi" and m.params_dict()["lambda"] == 0.2 for m in members)
    assert len({_hash(spec, m) for m in members}) == 3
    sets = TeacherSetsSpec.model_validate(
        {"ensemble": {"members": [{}, {"arch": "resnet18"}, {"loss": "mse", "seed": 7}]}}
    )
    a, b, c = teacher_set("ensemble", primary, sets, d)
    assert a == primary
    assert b.arch == "resnet18" and b.loss == "mcmi" and b.seed == 3
    assert c.loss == "mse" and c.params == () and c.seed == 7


def test_cells_of_single_teacher_methods_need_only_their_own_teacher():
    spec = _spec(["ce", "mse"], method=("kd", "ce"))
    assert spec.cell_teachers(Cell("none", "ce", "pgd")) == []
    (t,) = spec.cell_teachers(Cell("mse", "kd", "pgd"))
    assert t.loss == "mse"
    assert [t.label for t in spec.all_teachers()] == ["ce", "mse"]
