"""One registration idiom (a decorator at the definition) for every registry, and `sweep list`
showing the evaluation-only attacks (AutoAttack and its variants) with their options."""

from __future__ import annotations

import json
import typing

import pytest
from conftest import sweep_cli

from sweep.attacks import ATTACKS
from sweep.autoattack import VERSIONS
from sweep.evaluate import EVAL_ATTACKS, autoattack_metrics
from sweep.methods import METHODS
from sweep.registry import Registry
from sweep.spec import AttackRun
from sweep.teacher_losses import TEACHER_LOSSES


def test_the_decorator_registers_and_returns_the_object_unchanged():
    things: Registry[object] = Registry("thing")

    @things.register("b")
    def b() -> int:
        return 2

    @things.register("a")
    class A:
        pass

    assert b() == 2 and things.get("b") is b
    assert things.get("a") is A and A.name == "a"  # a class's key is written once, in the decorator
    assert things.names() == ["a", "b"]  # sorted: the order of registration changes nothing
    with pytest.raises(ValueError, match="registered twice"):
        things.register("a")(object())
    with pytest.raises(ValueError, match="named 'c', not 'd'"):
        things.register("d")(type("C", (), {"name": "c"}))
    with pytest.raises(KeyError, match="unknown thing 'z'; allowed: a, b"):
        things.get("z")
    with pytest.raises(TypeError, match="takes no facts"):
        things.register("e", summary="x")


def test_a_registry_with_an_entry_type_stores_the_facts_beside_the_object():
    assert ATTACKS.get("pgd").fn is ATTACKS.get("cw_inf").fn  # one function under two names
    assert ATTACKS.get("pgd").name == "pgd" and ATTACKS.get("cw_inf").name == "cw_inf"
    assert EVAL_ATTACKS.get("autoattack").evaluate is autoattack_metrics


@pytest.mark.parametrize("registry", [METHODS, TEACHER_LOSSES], ids=["methods", "teacher_losses"])
def test_registered_classes_carry_their_registry_name(registry):
    for name, cls in registry.items():
        assert cls.name == name


def test_evaluation_only_attacks_are_not_training_attacks():
    assert "autoattack" in EVAL_ATTACKS and "autoattack" not in ATTACKS
    assert not set(EVAL_ATTACKS.names()) & set(ATTACKS.names())


def test_autoattack_variants_cover_its_versions_and_name_their_metric():
    info = EVAL_ATTACKS.get("autoattack")
    versions = typing.get_args(AttackRun.model_fields["version"].annotation)
    assert set(versions) == set(VERSIONS) == {v["version"] for v in info.variants.values()}
    for variant, values in info.variants.items():
        run = AttackRun.model_validate(variant)
        assert run.model_dump(include={"name", *values}) == {"name": "autoattack", **values}
        assert run.key == variant


def test_sweep_list_json_shows_the_evaluation_attacks_with_their_options(tmp_path):
    r = sweep_cli(tmp_path, "list", "--json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    aa = listing["evaluation_attacks"]["autoattack"]
    assert "AutoAttack" in aa["summary"]
    assert aa["norms"] == ["linf", "l2"]
    assert aa["options"]["version"]["default"] == "standard"
    for version, attacks in VERSIONS.items():
        assert f"{version}: {', '.join(attacks)}" in aa["options"]["version"]["doc"]
    assert aa["options"]["examples"]["default"] is None
    assert {"eps", "norm"} <= set(aa["options"])
    assert aa["variants"] == {
        "autoattack": {"version": "standard"},
        "autoattack_apgd": {"version": "apgd"},
    }
    # beside the training attacks, which keep their own entry
    assert "autoattack" not in listing["attacks"]
    assert listing["attacks"]["pgd"]["norms"] == ["linf", "l2"]


def test_sweep_list_shows_the_evaluation_attacks_with_their_options(tmp_path):
    r = sweep_cli(tmp_path, "list")
    assert r.returncode == 0, r.stderr
    section = r.stdout.split("evaluation_attacks:")[1]
    assert "autoattack" in section and "version=standard" in section
    assert "autoattack_apgd" in section and "version: apgd" in section


def test_sweep_list_shows_paper_settings_fidelity_and_training_protocols(tmp_path):
    from sweep.methods import METHODS
    from sweep.teacher_losses import TEACHER_LOSSES

    listing = json.loads(sweep_cli(tmp_path, "list", "--json").stdout)
    for name, info in listing["methods"].items():
        cls = METHODS.get(name)
        assert info["paper_default"] == {k: v for k, v in cls.paper_default.items()}
        assert info["fidelity"]["checked"] == cls.fidelity.checked
        assert info["fidelity"]["departures"] == list(cls.fidelity.departures)
    for name, info in listing["teacher_losses"].items():
        assert info["fidelity"]["checked"] == TEACHER_LOSSES.get(name).fidelity.checked
    assert listing["attacks"]["pgd"]["training"] == "10 x eps/4"
    assert listing["attacks"]["fgsm_rs"]["training"] == "1 x 1.25*eps"
    assert listing["attacks"]["pgd"]["evaluation_step"] == "2.5*eps/steps"
    assert listing["attacks"]["mifgsm"]["params"]["decay"]["default"] == 1.0
    text = sweep_cli(tmp_path, "list").stdout
    ard = text.split("\n  ard ", 1)[1].split("\n  ataka ", 1)[0]
    assert "paper 30" in ard and "fidelity: authors-code" in ard and "departs:" in ard
    assert "training: 10 x eps/4; evaluation step: 2.5*eps/steps" in text
