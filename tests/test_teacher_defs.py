"""Teacher entries, parameter lists and teacher sets resolve to content-defined teachers."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from sweep.spec import Cell, SpecError, parse_spec
from sweep.teacher_defs import (
    MissingTeacher,
    TeacherEntry,
    TeacherOverride,
    TeacherSetsSpec,
    teacher_set,
)
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
    assert variants["mcmi(lambda=0.1)"].params_dict() == {
        "lambda": 0.1,
        "centroids": "full_pass",
        "momentum": 0.9,
    }
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


SHA = "ab" * 32
CKPT = {"uri": "/models/trades.pt", "sha256": SHA, "arch": "wrn34_10", "format": "robustbench"}
MCMI_OPTIM = {
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 64,
    "schedule": "cosine",
}


def _one(spec):
    (t,) = spec.teacher_variants().values()
    return t


def test_mcmi_means_its_authors_recipe_a_fine_tune_of_a_ce_teacher():
    spec = _spec(["mcmi"], teacher={"epochs": 7, "arch": "resnet18"})
    t = _one(spec)
    assert (t.label, t.source, t.epochs, t.arch, t.seed) == ("mcmi", "finetuned", 20, "resnet18", 3)
    assert t.optim_dict() == MCMI_OPTIM
    assert t.params_dict()["lambda"] == 0.25 and t.params_dict()["centroids"] == "full_pass"
    parent = t.init
    assert (parent.loss, parent.epochs, parent.arch, parent.seed, parent.source) == (
        "ce",
        7,
        "resnet18",
        3,
        "trained",
    )
    assert parent == _one(_spec(["ce"], teacher={"epochs": 7, "arch": "resnet18"}))
    ident = teacher_identity(spec, t)
    assert ident["optim"] | {} == spec.teacher.optim.model_dump() | MCMI_OPTIM
    assert ident["finetuned_from"] == teacher_identity(spec, parent)
    mobile = _one(_spec(["mcmi"], teacher={"arch": "mobilenetv2"}))
    assert mobile.optim_dict()["lr"] == 0.005


def test_start_scratch_trains_mcmi_from_scratch_and_a_mapping_overrides_the_recipe():
    scratch = _one(_spec([{"name": "mcmi", "start": "scratch", "params": {"centroids": "ema"}}]))
    assert scratch.source == "trained" and scratch.init is None and scratch.optim is None
    assert scratch.label == "mcmi(centroids=ema,from=scratch)"
    tuned = _one(_spec([{"name": "mcmi", "finetune": {"epochs": 2, "optim": {"lr": 0.01}}}]))
    assert tuned.epochs == 2 and tuned.optim_dict() == MCMI_OPTIM | {"lr": 0.01}
    assert tuned.init.loss == "ce" and tuned.label == "mcmi"  # still the recipe, adjusted


def test_finetune_from_any_teacher_entry_with_its_own_settings():
    entry = {
        "name": "trades",
        "label": "trades_ft",
        "finetune": {
            "from": {"name": "label_smoothing", "params": {"smoothing": 0.2}, "epochs": 4},
            "epochs": 5,
            "optim": {"lr": 0.01},
        },
    }
    spec = _spec([entry])
    t = _one(spec)
    assert (t.label, t.loss, t.epochs, t.optim_dict()) == ("trades_ft", "trades", 5, {"lr": 0.01})
    assert t.params_dict()["eps"] == 0.1  # the sweep's threat eps, as for any trades teacher
    p = t.init
    assert (p.loss, p.params_dict(), p.epochs, p.seed) == (
        "label_smoothing",
        {"smoothing": 0.2},
        4,
        3,
    )
    # no label: where it starts is in the default label
    auto = _one(_spec([{"name": "trades", "finetune": {"from": "ce", "epochs": 5}}]))
    assert auto.label == "trades(from=ce)" and auto.init.loss == "ce"
    # a parent's own fine-tune (mcmi's recipe) nests
    nested = _one(_spec([{"name": "trades", "finetune": {"from": "mcmi", "epochs": 1}}]))
    assert nested.init.loss == "mcmi" and nested.init.init.loss == "ce"


@pytest.mark.parametrize(
    "entry,words",
    [
        ({"name": "trades", "finetune": {"epochs": 3}}, "finetune.from: required"),
        ({"name": "ce", "finetune": {"from": "ce", "optim": {"lr": -1}}}, "lr"),
        ({"name": "ce", "finetune": {"from": "ce", "optim": {"nesterv": True}}}, "allowed:"),
        ({"name": "ce", "finetune": {"from": "ce", "optm": {}}}, "allowed: epochs, from, optim"),
        (
            {"name": "ce", "finetune": {"from": {"name": "mcmi", "params": {"lambda": [1, 2]}}}},
            "one teacher",
        ),
        ({"name": "trades", "checkpoint": CKPT, "finetune": {"from": "ce"}}, "not both"),
        ({"name": "trades", "checkpoint": CKPT, "epochs": 3}, "not trained"),
        ({"name": "trades", "checkpoint": CKPT | {"sha256": "xyz"}}, "sha256"),
        ({"name": "trades", "checkpoint": CKPT | {"format": "keras"}}, "format"),
        ({"name": "trades", "checkpoint": CKPT, "arch": "resnet18"}, "disagrees"),
        ({"name": "mcmi", "epochs": 3}, "give finetune.epochs"),
        ({"name": "mcmi", "start": "scratch", "finetune": {"from": "ce"}}, "contradicts"),
        ({"name": "mcmi", "start": "fresh"}, "start"),
        ({"name": "mcmi", "params": {"centroids": "running"}}, "must be one of full_pass, ema"),
    ],
)
def test_bad_starts_are_refused_at_load_time_with_what_is_wrong(entry, words):
    with pytest.raises(SpecError, match=words):
        _spec([entry])


def test_a_checkpoint_teacher_is_loaded_not_trained_and_its_identity_is_its_bytes():
    spec = _spec([{"name": "trades", "label": "trades_wrn", "checkpoint": CKPT}])
    t = _one(spec)
    assert (t.source, t.epochs, t.arch, t.init) == ("checkpoint", 0, "wrn34_10", None)
    assert t.checkpoint.sha256 == SHA and t.checkpoint.format == "robustbench"
    ident = teacher_identity(spec, t)
    assert ident["checkpoint"] == {"sha256": SHA, "format": "robustbench"}
    assert "/models/trades.pt" not in str(ident)
    moved = _spec([{"name": "trades", "label": "x", "checkpoint": CKPT | {"uri": "s3://b/t.pt"}}])
    assert _hash(moved, _one(moved)) == _hash(spec, t)
    assert dataclasses.replace(_one(moved), label="") == dataclasses.replace(t, label="")
    other = _spec([{"name": "trades", "checkpoint": CKPT | {"sha256": "cd" * 32}}])
    assert _hash(other, _one(other)) != _hash(spec, t)
    fmt = _spec([{"name": "trades", "checkpoint": CKPT | {"format": "state_dict"}}])
    assert _hash(fmt, _one(fmt)) != _hash(spec, t)
    assert _one(other).label == "trades(sha256=cdcdcdcd)"


def test_a_fine_tuned_teachers_hash_follows_its_parent_and_its_fine_tune_settings():
    def h(entry, **over):
        s = _spec([entry], **over)
        return _hash(s, _one(s))

    base = {"name": "trades", "finetune": {"from": "ce", "epochs": 5}}
    ref = h(base)
    assert h(base) == ref
    assert h({"name": "trades", "finetune": {"from": "mse", "epochs": 5}}) != ref  # parent
    assert (
        h({"name": "trades", "finetune": {"from": {"name": "ce", "seed": 1}, "epochs": 5}}) != ref
    )
    assert h(base, teacher={"epochs": 3}) != ref  # the parent's default epochs
    assert h({"name": "trades", "finetune": {"from": "ce", "epochs": 6}}) != ref
    assert (
        h({"name": "trades", "finetune": {"from": "ce", "epochs": 5, "optim": {"lr": 1e-3}}}) != ref
    )
    assert h({"name": "trades", "label": "renamed", "finetune": {"from": "ce", "epochs": 5}}) == ref
    ckpt_parent = {"name": "trades", "finetune": {"from": {"name": "ce", "checkpoint": CKPT}}}
    moved = {
        "name": "trades",
        "finetune": {"from": {"name": "ce", "checkpoint": CKPT | {"uri": "/x"}}},
    }
    assert (
        h(ckpt_parent)
        == h(moved)
        != h(
            {
                "name": "trades",
                "finetune": {"from": {"name": "ce", "checkpoint": CKPT | {"sha256": "cd" * 32}}},
            }
        )
    )
    # a fine-tune is not its parent's scratch twin, even with equal loss, epochs and seed
    scratch = _spec([{"name": "trades", "epochs": 5}])
    assert _hash(scratch, _one(scratch)) != ref


def test_teacher_defs_stay_hashable_and_equal_by_content():
    a = _one(_spec([{"name": "trades", "label": "a", "finetune": {"from": "ce", "epochs": 5}}]))
    b = _one(_spec([{"name": "trades", "label": "b", "finetune": {"from": "ce", "epochs": 5}}]))
    assert a != b and dataclasses.replace(a, label="") == dataclasses.replace(b, label="")
    assert len({dataclasses.replace(a, label=""), dataclasses.replace(b, label="")}) == 1


def test_teacher_sets_take_checkpoints_and_recipes_too():
    spec = _spec(["ce"])
    primary, d = _one(spec), spec.teacher_defaults()
    sets = TeacherSetsSpec.model_validate(
        {"robust": {"loss": "trades", "checkpoint": CKPT | {"arch": None}}}
    )
    _, robust = teacher_set("clean+robust", primary, sets, d)
    assert robust.source == "checkpoint" and robust.loss == "trades" and robust.arch == "small_cnn"
    sets = TeacherSetsSpec.model_validate({"robust": {"loss": "mcmi"}})
    _, robust = teacher_set("clean+robust", primary, sets, d)
    assert robust.source == "finetuned" and robust.init == primary and robust.epochs == 20
    # an ensemble of a fine-tuned teacher: the whole chain re-seeded, so members differ
    tuned = _one(_spec(["mcmi"]))
    members = teacher_set("ensemble", tuned, TeacherSetsSpec(), d)
    assert [(m.seed, m.init.seed) for m in members] == [(3, 3), (4, 4), (5, 5)]
    assert all(m.optim == tuned.optim and m.epochs == 20 for m in members)
    (other_arch,) = [
        m
        for m in teacher_set(
            "ensemble",
            tuned,
            TeacherSetsSpec.model_validate(
                {"ensemble": {"members": [{}, {"arch": "mobilenetv2"}]}}
            ),
            d,
        )
        if m.arch == "mobilenetv2"
    ]
    assert other_arch.init.arch == "mobilenetv2" and other_arch.optim_dict()["lr"] == 0.005
    loaded = _one(_spec([{"name": "trades", "checkpoint": CKPT}]))
    with pytest.raises(ValueError, match="loaded from a checkpoint"):
        teacher_set("ensemble", loaded, TeacherSetsSpec(), d)
    with pytest.raises(ValidationError, match="not both"):
        TeacherOverride.model_validate({"checkpoint": CKPT, "finetune": {"from": "ce"}})


def test_a_bare_entry_still_parses_as_before():
    e = TeacherEntry.model_validate("ce")
    assert e.name == "ce" and e.finetune is None and e.checkpoint is None


def test_a_dumped_sweep_parses_back_to_the_same_teachers():
    from sweep.spec import spec_to_dict

    spec = _spec(
        [
            "mcmi",
            {"name": "mcmi", "start": "scratch", "label": "mcmi_scratch"},
            {"name": "trades", "label": "ft", "finetune": {"from": {"name": "ce", "epochs": 2}}},
            {"name": "trades", "label": "wrn", "checkpoint": CKPT},
        ],
        teacher_sets={"robust": {"loss": "trades", "checkpoint": CKPT}},
    )
    again = parse_spec(spec_to_dict(spec))
    assert again.teacher_variants() == spec.teacher_variants()
    assert [t.source for t in again.teacher_variants().values()] == [
        "finetuned",
        "trained",
        "finetuned",
        "checkpoint",
    ]
    assert again.teacher_sets == spec.teacher_sets


def test_teacher_generations_put_each_parent_before_its_children_once():
    from sweep.teacher_defs import teacher_generations

    # two mcmi teachers fine-tune the same ce (their default start), which the grid also has,
    # and a trades teacher fine-tunes one of them
    spec = _spec(
        [
            "ce",
            {"name": "mcmi", "params": {"lambda": [0.1, 0.25]}},
            {"name": "trades", "finetune": {"from": {"name": "mcmi"}, "epochs": 1}},
        ]
    )
    gens = teacher_generations(spec.all_teachers())
    assert [sorted(t.loss for t in g) for g in gens] == [["ce"], ["mcmi", "mcmi"], ["trades"]]
    assert len({_hash(spec, t) for g in gens for t in g}) == 4  # the shared ce once
    # its parent, {name: mcmi}, is mcmi(lambda=0.25) by content (0.25 is the default)
    parent = dataclasses.replace(gens[2][0].init, label="")
    assert parent in [dataclasses.replace(t, label="") for t in gens[1]]
