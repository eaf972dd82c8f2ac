"""The sweep file's `train_attack:` (sweep.attack_defs): per-attack settings that reach the
attack that owns them and no other (issue 17 bug 2), the literature's training protocol by
default, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder
from pydantic import ValidationError
from torch import nn

from sweep.attack_defs import TrainAttackSpec
from sweep.attacks import ATTACKS, ce_objective, pgd
from sweep.training import TrainAttack

EPS = 8 / 255


def _spec(d: dict) -> TrainAttackSpec:
    return TrainAttackSpec.model_validate(d)


def _linear():
    """logits = x @ w, no bias: the input gradient of CE is known in closed form."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    model[1].weight.data = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    return model


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    # interior points: no coordinate is clipped to [0, 1] by a step of at most 1.25 * 8/255 + eps
    return 0.2 + 0.6 * torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# --- defaults: each attack's own protocol --------------------------------------------------------


def test_defaults_are_the_literature_training_protocol():
    s = TrainAttackSpec()
    assert s.resolve("pgd", EPS, "linf") == TrainAttack("pgd", EPS, 10, EPS / 4, "linf")
    assert s.resolve("cw_inf", EPS, "linf") == TrainAttack("cw_inf", EPS, 10, EPS / 4, "linf")
    assert s.resolve("fgsm", EPS, "linf") == TrainAttack("fgsm", EPS, 1, EPS, "linf")
    assert s.resolve("fgsm_rs", EPS, "linf") == TrainAttack("fgsm_rs", EPS, 1, 1.25 * EPS, "linf")
    mi = s.resolve("mifgsm", EPS, "linf")
    assert mi == TrainAttack("mifgsm", EPS, 10, EPS / 10, "linf", (("decay", 1.0),))
    assert s.resolve("none", EPS, "linf").step_size == 0.0
    assert s.resolve("pgd", EPS, "linf").step_size == pytest.approx(2 / 255)


def test_every_resolved_step_size_is_a_number_and_the_norm_passes_through():
    s = TrainAttackSpec()
    for name in ATTACKS:
        a = s.resolve(name, EPS, "linf")
        assert isinstance(a.step_size, float) and a.eps == EPS and a.norm == "linf"
    assert s.resolve("pgd", 0.5, "l2") == TrainAttack("pgd", 0.5, 10, 0.125, "l2")


def test_eps_of_the_file_overrides_the_threat_and_the_rules_follow_it():
    s = _spec({"eps": 0.1})
    assert s.resolve("pgd", EPS, "linf").step_size == pytest.approx(0.025)
    assert s.resolve("fgsm_rs", EPS, "linf").step_size == pytest.approx(0.125)


def test_steps_set_for_mifgsm_keep_its_eps_over_steps_rule():
    a = _spec({"mifgsm": {"steps": 5}}).resolve("mifgsm", EPS, "linf")
    assert (a.steps, a.step_size) == (5, pytest.approx(EPS / 5))


# --- bug 2: a setting reaches its own attack only ------------------------------------------------


def test_a_pgd_step_size_leaves_fgsm_and_fgsm_rs_their_own_steps():
    s = _spec({"pgd": {"step_size": 2 / 255}})
    assert s.resolve("pgd", EPS, "linf").step_size == 2 / 255
    assert s.resolve("fgsm", EPS, "linf").step_size == pytest.approx(EPS)
    assert s.resolve("fgsm_rs", EPS, "linf").step_size == pytest.approx(1.25 * EPS)
    assert s.resolve("mifgsm", EPS, "linf").step_size == pytest.approx(EPS / 10)


def test_fgsm_moves_every_coordinate_by_exactly_eps_on_a_linear_model():
    """The actual perturbation, not only the resolved number: a pgd step size set in the file
    does not shrink FGSM's step."""
    model = _linear()
    x, y = _batch()
    attack = _spec({"pgd": {"step_size": 2 / 255}}).resolve("fgsm", EPS, "linf")
    delta = attack(model, x, ce_objective(y)) - x
    assert torch.allclose(delta.abs(), torch.full_like(x, EPS))


def test_fgsm_rs_steps_1_25_eps_from_its_uniform_start():
    model = _linear()
    x, y = _batch()
    attack = _spec({"pgd": {"step_size": 2 / 255}}).resolve("fgsm_rs", EPS, "linf")
    rec = Recorder(model)
    got = attack(rec, x, ce_objective(y))
    start = rec.seen[0]
    assert 0 < (start - x).abs().max() <= EPS + 1e-6  # a uniform start, not x
    x_req = start.clone().requires_grad_(True)
    F.cross_entropy(model(x_req), y, reduction="sum").backward()
    unclipped = start + 1.25 * EPS * x_req.grad.sign()
    expected = torch.min(torch.max(unclipped, x - EPS), x + EPS)
    assert torch.allclose(got, expected)
    # the 1.25 * eps step, not pgd's 2/255: most coordinates end on the ball's boundary
    assert ((got - x).abs() > EPS - 1e-6).float().mean() > 0.5


def test_a_pgd_step_size_set_in_the_file_reaches_pgd():
    model = _linear()
    x, y = _batch()
    attack = _spec({"pgd": {"steps": 3, "step_size": 0.003}}).resolve("pgd", EPS, "linf")
    rec = Recorder(model)
    attack(rec, x, ce_objective(y))
    assert len(rec.seen) == 3
    # interior coordinates of the first step moved by exactly 0.003
    moved = (rec.seen[1] - rec.seen[0]).abs()
    inside = (rec.seen[0] - x).abs() < EPS - 0.003
    assert torch.allclose(moved[inside], torch.tensor(0.003), atol=1e-6)


def test_mifgsm_decay_reaches_mifgsm():
    model = _linear()
    x, y = _batch()
    momentum = _spec({"mifgsm": {"params": {"decay": 1.0}}}).resolve("mifgsm", EPS, "linf")
    none = _spec({"mifgsm": {"params": {"decay": 0.0}}}).resolve("mifgsm", EPS, "linf")
    assert none.params == (("decay", 0.0),)
    a, b = momentum(model, x, ce_objective(y)), none(model, x, ce_objective(y))
    assert not torch.equal(a, b)
    # decay 0: no momentum, i.e. iterated FGSM of step eps/steps from x
    plain = pgd(
        model, x, ce_objective(y), eps=EPS, steps=10, step_size=EPS / 10, random_start=False
    )
    assert torch.allclose(b, plain)


def test_train_attack_passes_start_through():
    model = _linear()
    x, y = _batch()
    rec = Recorder(model)
    start = x + 0.001
    TrainAttackSpec().resolve("mifgsm", EPS, "linf")(rec, x, ce_objective(y), start=start)
    assert torch.equal(rec.seen[0], start)


# --- protocol and the file's round trip -----------------------------------------------------------


def test_protocol_has_one_row_per_grid_attack_with_resolved_numbers():
    rows = _spec({"pgd": {"step_size": 0.007}}).protocol(
        ["none", "fgsm", "pgd", "mifgsm"], EPS, "linf"
    )
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["none", "fgsm", "pgd", "mifgsm"]
    assert by["pgd"] == {
        "name": "pgd",
        "eps": EPS,
        "steps": 10,
        "step_size": 0.007,
        "step_rule": "set",
        "params": {},
    }
    assert by["fgsm"]["step_rule"] == "eps" and by["fgsm"]["step_size"] == pytest.approx(EPS)
    assert by["mifgsm"]["params"] == {"decay": 1.0} and by["mifgsm"]["step_rule"] == "eps/steps"


def test_log_params_are_flat_and_plain():
    a = _spec({"mifgsm": {"params": {"decay": 0.5}}}).resolve("mifgsm", EPS, "linf")
    assert a.log_params() == {
        "train_attack_eps": EPS,
        "train_attack_steps": 10,
        "train_attack_step_size": EPS / 10,
        "train_attack_norm": "linf",
        "train_attack_decay": 0.5,
    }
    assert repr(a).startswith("TrainAttack(name='mifgsm', eps=")


def test_the_flat_yaml_form_round_trips():
    d = {
        "eps": None,
        "pgd": {"steps": 10, "step_size": 0.00784},
        "mifgsm": {"params": {"decay": 0.9}},
    }
    s = _spec(d)
    assert s.model_dump() == d
    assert _spec(s.model_dump()) == s
    assert TrainAttackSpec().model_dump() == {"eps": None}


# --- clear errors --------------------------------------------------------------------------------


def _error(d: dict) -> str:
    with pytest.raises(ValidationError) as e:
        _spec(d)
    return str(e.value)


def test_unknown_attack_key_names_it_and_the_allowed_names():
    msg = _error({"pdg": {"steps": 3}})
    assert "pdg: not a training attack" in msg
    assert "cw_inf, fgsm, fgsm_rs, mifgsm, none, pgd" in msg


@pytest.mark.parametrize(
    "old", [{"step_size": 0.01}, {"steps": 5}, {"steps": 5, "step_size": 0.01}]
)
def test_the_old_top_level_step_is_an_error_saying_why_and_showing_the_per_attack_form(old):
    msg = _error(old)
    assert "would apply to every training attack" in msg
    assert "FGSM's step of eps" in msg and "pgd: {steps: 10, step_size:" in msg


def test_unknown_param_names_the_attack_the_param_and_the_allowed_ones():
    msg = _error({"mifgsm": {"params": {"decy": 1.0}}})
    assert "mifgsm.params.decy: not a parameter of attack 'mifgsm'; allowed: decay" in msg
    assert "allowed: none" in _error({"pgd": {"params": {"decay": 1.0}}})


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"mifgsm": {"params": {"decay": -0.5}}}, "mifgsm.params.decay: must be >= 0"),
        ({"mifgsm": {"params": {"decay": True}}}, "mifgsm.params.decay: must be a number"),
        ({"cw_inf": {"params": {"kappa": 50}}}, "cw_inf.params.kappa: does not apply"),
        ({"fgsm": {"steps": 3}}, "fgsm.steps: fgsm takes one step"),
        ({"none": {"step_size": 0.1}}, "none: takes no settings"),
        ({"pgd": {"step_size": 0}}, "pgd.step_size: Input should be greater than 0"),
        ({"pgd": {"stepsize": 0.1}}, "did you mean 'step_size'?"),
        ({"eps": 2}, "less than or equal to 1"),
    ],
)
def test_bad_settings_name_the_attack_and_the_field(d, expected):
    assert expected in _error(d)
