"""Attack mechanics: formulas, eps-ball and data range, the model left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder
from torch import nn

from sweep.attacks import (
    ATTACKS,
    attack_view,
    ce_objective,
    cw_inf_objective,
    cw_objective,
    eval_mode,
    fgsm,
    input_grad,
    mifgsm,
    pgd,
    run_attack,
    uniform_in_ball,
)
from sweep.evaluate import accuracy, evaluate_suite
from sweep.models import Normalize, build_model
from sweep.spec import AttackRun


def _model():
    torch.manual_seed(0)
    m = build_model("small_cnn", in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,))
    # put non-trivial statistics in the batch-norm buffers
    m.train()
    with torch.no_grad():
        m(torch.rand(64, 1, 8, 8))
    return m


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _linear():
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    model[1].weight.data = w.T.clone()
    return model


def test_fgsm_is_one_signed_gradient_step_of_size_eps_clipped():
    model = _linear()
    x, y = _batch()
    eps = 0.1
    x_req = x.clone().requires_grad_(True)
    F.cross_entropy(model(x_req), y, reduction="sum").backward()
    expected = (x + eps * x_req.grad.sign()).clamp(0, 1)
    got = run_attack("fgsm", model, x, ce_objective(y), eps=eps)
    assert torch.allclose(got, expected)


# every registered attack on every norm it supports, with the eps of that threat model
ATTACK_NORMS = [(n, norm) for n, a in ATTACKS.items() for norm in a.norms]
EPS = {"linf": 0.2, "l2": 1.0}


def _distance(x_adv, x, norm):
    """Per-example L-inf or L2 distance."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def _bn_dropout_model():
    """Batch norm (with non-trivial statistics) and dropout, left in train mode, one submodule
    in eval: an attack must hand back exactly this."""
    torch.manual_seed(0)
    m = nn.Sequential(
        Normalize((0.3,), (0.4,)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    m.train()
    with torch.no_grad():
        m(torch.rand(64, 1, 8, 8))
    m[5].eval()
    return m


@pytest.mark.parametrize(("name", "norm"), ATTACK_NORMS)
def test_adversarial_examples_stay_in_eps_ball_and_data_range(name, norm):
    model = _model()
    x, y = _batch()
    eps = EPS[norm]
    x_adv = run_attack(name, model, x, ATTACKS.get(name).objective(y), eps=eps, steps=7, norm=norm)
    assert (_distance(x_adv, x, norm) <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv, x) == (name == "none")
    assert not x_adv.requires_grad


@pytest.mark.parametrize(("name", "norm"), ATTACK_NORMS)
def test_every_attack_leaves_parameters_buffers_grads_modes_and_input_untouched(name, norm):
    model = _bn_dropout_model()
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    x, y = _batch()
    x_before = x.clone()
    run_attack(name, model, x, ATTACKS.get(name).objective(y), eps=EPS[norm], steps=3, norm=norm)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before)


@pytest.mark.parametrize(("name", "norm"), [an for an in ATTACK_NORMS if an[0] != "none"])
def test_every_attack_increases_its_own_objective(name, norm):
    model = _linear()
    x, y = _batch(64)
    objective = ATTACKS.get(name).objective(y)
    torch.manual_seed(0)
    x_adv = run_attack(name, model, x, objective, eps=EPS[norm] / 2, steps=5, norm=norm)
    with torch.no_grad():
        assert objective(model(x_adv)) > objective(model(x)) + 1.0


@pytest.mark.parametrize("name", [n for n, a in ATTACKS.items() if "l2" not in a.norms])
def test_unsupported_norm_is_an_error_naming_the_attack_and_the_allowed_norms(name):
    x, y = _batch()
    with pytest.raises(ValueError, match=rf"{name}.*'l2'.*allowed: linf$"):
        run_attack(name, _linear(), x, ce_objective(y), eps=0.1, norm="l2")


def test_unknown_norm_is_an_error_also_when_the_function_is_called_directly():
    x, y = _batch()
    with pytest.raises(ValueError, match="'pgd'.*'l1'.*allowed: linf, l2"):
        run_attack("pgd", _linear(), x, ce_objective(y), eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="'fgsm'.*allowed: linf"):
        fgsm(_linear(), x, ce_objective(y), eps=0.1, norm="l2")


def test_registry_names_objectives_and_norms():
    assert {"none", "fgsm", "fgsm_rs", "pgd", "cw_inf", "mifgsm"} <= set(ATTACKS.names())
    assert ATTACKS.get("cw_inf").objective is cw_inf_objective
    assert ATTACKS.get("cw_inf").fn is pgd and ATTACKS.get("cw_inf").iterative
    assert all(ATTACKS.get(n).objective is ce_objective for n in ("fgsm", "fgsm_rs", "pgd"))
    assert ATTACKS.get("pgd").norms == ("linf", "l2")
    assert not ATTACKS.get("fgsm_rs").iterative and ATTACKS.get("mifgsm").iterative


def _ce_grad(model, x, y):
    """Hand gradient of the summed CE of the bias-free linear model (logits = x @ w):
    (softmax(x @ w) - onehot(y)) @ w^T, no autograd."""
    w = model[1].weight.detach().T
    p = torch.softmax(x.flatten(1) @ w, dim=1)
    return ((p - F.one_hot(y, 10).float()) @ w.T).view_as(x)


def _clip_linf(x_adv, x, eps):
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


@pytest.mark.parametrize("step_size", [None, 0.05])
def test_fgsm_rs_is_a_uniform_start_then_one_signed_step_of_1_25_eps_projected(step_size):
    model = _linear()
    x, y = _batch()
    eps = 0.1
    torch.manual_seed(5)
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    alpha = 1.25 * eps if step_size is None else step_size
    expected = _clip_linf(start + alpha * _ce_grad(model, start, y).sign(), x, eps)
    torch.manual_seed(5)
    got = run_attack("fgsm_rs", model, x, ce_objective(y), eps=eps, steps=10, step_size=step_size)
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, run_attack("fgsm", model, x, ce_objective(y), eps=eps))


def test_mifgsm_accumulates_l1_normalised_gradients_with_momentum_one():
    model = _linear()
    x, y = _batch()
    eps, steps = 0.1, 2
    alpha = eps / steps  # the default step

    def normalised(g):
        return g / g.abs().flatten(1).mean(1).view(-1, 1, 1, 1)

    g1 = normalised(_ce_grad(model, x, y))
    x1 = _clip_linf(x + alpha * g1.sign(), x, eps)
    grad1 = _ce_grad(model, x1, y)
    g2 = g1 + normalised(grad1)
    x2 = _clip_linf(x1 + alpha * g2.sign(), x, eps)
    # the momentum must matter in this example, or the test would not see it
    assert not torch.equal(g2.sign(), grad1.sign())

    rec = Recorder(model)
    got = mifgsm(rec, x, ce_objective(y), eps=eps, steps=steps)
    assert torch.equal(rec.seen[0], x)  # no random start
    assert torch.allclose(rec.seen[1], x1)
    assert torch.allclose(got, x2)


def test_l2_pgd_steps_along_g_over_its_l2_norm_with_the_default_step_and_stays_in_the_ball():
    model = _linear()
    x, y = _batch()
    x = 0.3 + 0.4 * x  # interior: no coordinate is clipped in the first step
    eps, steps = 1.0, 10
    rec = Recorder(model)
    got = pgd(rec, x, ce_objective(y), eps=eps, steps=steps, norm="l2", random_start=False)
    g = _ce_grad(model, x, y)
    expected_step = 2.5 * eps / steps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(rec.seen[1] - x, expected_step, atol=1e-6)
    for x_i in [*rec.seen, got]:
        assert (_distance(x_i, x, "l2") <= eps + 1e-5).all()
    # ten steps of 0.25 reach the boundary (up to the odd coordinate clipped to [0, 1])
    assert (_distance(got, x, "l2") > 0.99 * eps).all()


def test_run_attack_passes_the_norm_through():
    model = _linear()
    x, y = _batch()
    torch.manual_seed(2)
    got = run_attack("pgd", model, x, ce_objective(y), eps=0.5, steps=3, norm="l2")
    torch.manual_seed(2)
    assert torch.equal(got, pgd(model, x, ce_objective(y), eps=0.5, steps=3, norm="l2"))
    assert (_distance(got, x, "linf") > 0.5 / 8).any()  # not an L-inf attack of a tiny eps


def test_l2_random_start_is_uniform_in_the_ball():
    torch.manual_seed(0)
    n, d, eps = 4000, 16, 0.5
    x = torch.full((n, 1, 4, 4), 0.5)  # no coordinate can leave [0, 1] within radius 0.5
    delta = (uniform_in_ball(x, eps, "l2") - x).flatten(1)
    r = delta.norm(dim=1) / eps
    assert r.max() <= 1 + 1e-6
    # uniform in volume: P(r <= t) = t^d; a uniform radius would give P(r <= 0.9) = 0.9
    assert abs((r <= 0.9).float().mean().item() - 0.9**d) < 0.02
    assert abs((r <= 0.97).float().mean().item() - 0.97**d) < 0.03
    # and no preferred direction
    assert (delta / delta.norm(dim=1, keepdim=True)).mean(0).abs().max() < 0.03


def test_cw_objective_is_the_clamped_margin_summed_over_the_batch():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, -1.0], [1.0, 1.0, 4.0]])
    y = torch.tensor([0, 0, 2])
    # margins max_{j != y} z_j - z_y: 1 - 2 = -1, 3 - 0 = 3, 1 - 4 = -3
    assert cw_objective(y)(logits).item() == pytest.approx(-1 + 0 - 3)
    assert cw_objective(y, kappa=2.0)(logits).item() == pytest.approx(-1 + 2 - 3)
    assert cw_objective(y, kappa=50.0)(logits).item() == pytest.approx(-1 + 3 - 3)
    assert cw_inf_objective(y)(logits).item() == pytest.approx(-1)
    # the robustness codes' cwloss: -clamp(z_y - max_other + kappa, min=0), summed; same up to
    # the constant kappa per example, hence the same gradient
    real, other = torch.tensor([2.0, 0.0, 4.0]), torch.tensor([1.0, 3.0, 1.0])
    cwloss = -(real - other + 50.0).clamp(min=0).sum()
    assert cw_inf_objective(y)(logits).item() == pytest.approx(cwloss.item() + 3 * 50.0)


def test_cw_objective_gradient_stops_past_kappa():
    logits = torch.tensor([[0.0, 5.0], [0.0, -5.0]], requires_grad=True)
    cw_objective(torch.tensor([0, 0]), kappa=1.0)(logits).backward()
    # example 0 is misclassified by 5 > kappa: no gradient; example 1 still pushed
    assert logits.grad.tolist() == [[0.0, 0.0], [-1.0, 1.0]]


def test_pgd_increases_the_loss_it_maximises_more_than_random_noise():
    model = _linear()
    x, y = _batch(64)
    noise = (x + 0.1 * torch.empty_like(x).uniform_(-1, 1)).clamp(0, 1)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
        noisy = F.cross_entropy(model(noise), y).item()
        adv = F.cross_entropy(
            model(run_attack("pgd", model, x, ce_objective(y), eps=0.1, steps=10)), y
        ).item()
    assert adv > clean + 1.0
    assert adv > noisy + 1.0


def test_pgd_beats_fgsm_and_fgsm_beats_clean_on_accuracy():
    model = _linear()
    x, y = _batch(64)
    # label the data with the model's own predictions: clean accuracy is then exactly 1
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    clean = accuracy(model, x, y)
    fgsm = accuracy(model, x, y, attack=AttackRun.model_validate("fgsm"), eps=0.1)
    pgd = accuracy(model, x, y, attack=AttackRun.model_validate("pgd20"), eps=0.1)
    assert clean == 1.0
    assert pgd <= fgsm < clean


def test_evaluation_leaves_parameters_buffers_grads_and_mode_untouched():
    model = _model()
    model.train()
    model[1][0].eval()  # a mixed-mode model must come back mixed
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    x, y = _batch()
    evaluate_suite(model, x, y, [AttackRun.model_validate(a) for a in ("fgsm", "pgd5")], eps=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_attack_runs_model_in_eval_mode(name):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x.flatten(1)[:, :10]

    probe = Probe().train()
    x, y = _batch()
    run_attack(name, probe, x, ATTACKS.get(name).objective(y), eps=0.1, steps=3)
    assert seen and not any(seen)
    assert probe.training


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "preact_resnet18"])
def test_attack_view_is_the_same_function_with_batch_norms_folded_and_frozen(arch):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=3, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    before = copy.deepcopy(model.state_dict())
    view = attack_view(model)
    x = torch.rand(4, 3, 32, 32)
    y = torch.arange(4)
    with eval_mode(model), torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(view(x), expected, rtol=1e-4, atol=1e-5)
    with eval_mode(model):
        g_model = input_grad(model, x, ce_objective(y))
    torch.testing.assert_close(input_grad(view, x, ce_objective(y)), g_model, rtol=1e-3, atol=1e-6)
    bns = lambda m: sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())  # noqa: E731
    if arch != "preact_resnet18":  # conv -> BN everywhere: every BN folded
        assert bns(view) == 0 < bns(model)
    else:  # BN -> ReLU -> conv keeps most BNs, folds the ones right after a conv
        assert 0 < bns(view) < bns(model)
    assert not any(p.requires_grad for p in view.parameters())
    assert not view.training
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attack_view_of_an_untraceable_model_is_a_frozen_unfolded_copy():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 10, 8), nn.BatchNorm2d(10)

        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor: torch.fx cannot trace this
                x = x * 1.0
            return self.bn(self.conv(x)).flatten(1)

    model = DataDependent()
    view = attack_view(model)
    x = torch.rand(2, 1, 8, 8)
    assert view is not model and isinstance(view.bn, nn.BatchNorm2d)
    with eval_mode(model), torch.no_grad():
        torch.testing.assert_close(view(x), model(x))
    assert not any(p.requires_grad for p in view.parameters())


def test_robust_accuracy_verdict_is_the_real_models_not_the_surrogates():
    """The surrogate only steers the attack: an example counts as robust by what `model` says.
    A surrogate whose gradient is zero leaves the inputs at their random start, so the robust
    accuracy is the real model's accuracy on those points, not the surrogate's."""
    model = _model().eval()
    x, y = _batch(64)
    with torch.no_grad():
        y = model(x).argmax(1)  # every example clean-correct

    class WrongConstant(nn.Module):  # predicts class (y + 1) mod 10, no input gradient
        def forward(self, inp):
            return F.one_hot((y + 1) % 10, 10).float() + 0 * inp.flatten(1)[:, :1]

    attack = AttackRun.model_validate({"name": "pgd", "steps": 3})
    acc = accuracy(model, x, y, attack=attack, eps=0.05, surrogate=WrongConstant())
    assert acc > 0.5  # the constant surrogate would have said 0.0


# --- start=, params and the declared training protocol (issue 17) ------------------------------


@pytest.mark.parametrize(("name", "norm"), [an for an in ATTACK_NORMS if an[0] != "none"])
def test_every_attack_takes_its_first_gradient_at_start_and_projects_the_result(name, norm):
    """`start` replaces the attack's own starting point (x or a uniform point); a start far
    outside the ball and [0, 1] still gives a result inside both."""
    model = _linear()
    x, y = _batch()
    eps = EPS[norm]
    start = x + 3 * eps * torch.randn_like(x)
    rec = Recorder(model)
    got = run_attack(name, rec, x, ce_objective(y), eps=eps, steps=3, norm=norm, start=start)
    assert torch.equal(rec.seen[0], start)
    assert (_distance(got, x, norm) <= eps + 1e-5).all()
    assert got.min() >= 0 and got.max() <= 1


def test_no_attack_ignores_start():
    x, y = _batch()
    got = run_attack("none", _linear(), x, ce_objective(y), eps=0.1, start=x + 0.05)
    assert torch.equal(got, x)


def test_fgsm_from_a_start_is_one_signed_step_of_the_gradient_there():
    model = _linear()
    x, y = _batch()
    eps = 0.1
    start = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(
        0, 1
    )
    expected = _clip_linf(start + eps * _ce_grad(model, start, y).sign(), x, eps)
    got = run_attack("fgsm", model, x, ce_objective(y), eps=eps, start=start)
    assert torch.allclose(got, expected)


def test_mifgsm_decay_reaches_the_attack_and_zero_decay_is_iterative_fgsm():
    """decay 0 drops the momentum: every step is sign(grad), i.e. PGD from x with step eps/steps."""
    model = _linear()
    x, y = _batch()
    eps, steps = 0.1, 4
    default = run_attack("mifgsm", model, x, ce_objective(y), eps=eps, steps=steps)
    no_momentum = run_attack("mifgsm", model, x, ce_objective(y), eps=eps, steps=steps, decay=0.0)
    plain = pgd(
        model, x, ce_objective(y), eps=eps, steps=steps, step_size=eps / steps, random_start=False
    )
    assert not torch.equal(default, no_momentum)
    assert torch.allclose(no_momentum, plain)


def test_run_attack_rejects_undeclared_and_objective_only_params():
    x, y = _batch()
    with pytest.raises(
        ValueError, match="'decy'.*not a parameter of attack 'mifgsm'; allowed: decay"
    ):
        run_attack("mifgsm", _linear(), x, ce_objective(y), eps=0.1, decy=1.0)
    with pytest.raises(ValueError, match="'decay'.*allowed: none"):
        run_attack("pgd", _linear(), x, ce_objective(y), eps=0.1, decay=1.0)
    with pytest.raises(ValueError, match="'kappa'.*does not apply to a training attack"):
        run_attack("cw_inf", _linear(), x, ce_objective(y), eps=0.1, kappa=10.0)
    with pytest.raises(ValueError, match="'decay'.*must be >= 0"):
        run_attack("mifgsm", _linear(), x, ce_objective(y), eps=0.1, decay=-1.0)


def test_declared_param_defaults_are_the_functions_and_objectives_defaults():
    """A declared default that disagreed with the function's keyword default would make the
    logged protocol lie about what evaluation (which passes no params) runs."""
    import inspect

    for name, info in ATTACKS.items():
        for key, decl in info.params.items():
            where = info.fn if decl.training else info.objective
            assert inspect.signature(where).parameters[key].default == decl.default, (name, key)
    assert ATTACKS.get("cw_inf").params["kappa"].default == 50.0


def test_training_protocol_declared_per_attack():
    """DESIGN §4.1: PGD 10 steps of eps/4 (2/255 at 8/255), FGSM eps, FGSM-RS 1.25*eps (Wong et
    al.), MI-FGSM 10 steps of eps/steps (Dong et al.), CW-inf as PGD."""
    eps = 8 / 255
    got = {
        n: (a.train_steps, a.train_step(eps, a.train_steps or 1), a.train_step.describe())
        for n, a in ATTACKS.items()
        if a.train_step is not None
    }
    assert got["pgd"] == (10, pytest.approx(2 / 255), "eps/4")
    assert got["cw_inf"] == (10, pytest.approx(2 / 255), "eps/4")
    assert got["fgsm"] == (None, pytest.approx(eps), "eps")
    assert got["fgsm_rs"] == (None, pytest.approx(1.25 * eps), "1.25*eps")
    assert got["mifgsm"] == (10, pytest.approx(eps / 10), "eps/steps")
    assert ATTACKS.get("none").train_step is None
    # every iterative attack declares its training steps; the others do not
    assert all((a.train_steps is not None) == a.iterative for n, a in ATTACKS.items())


def test_evaluation_default_step_of_pgd_is_still_madrys():
    """The training protocol lives in AttackInfo; the function's default (what evaluation
    runs when the file sets no step) is unchanged: 2.5 * eps / steps."""
    model = _linear()
    x, y = _batch()
    x = 0.3 + 0.4 * x
    rec = Recorder(model)
    pgd(rec, x, ce_objective(y), eps=0.2, steps=10, random_start=False)
    step = (rec.seen[1] - rec.seen[0]).abs()
    assert torch.allclose(step[step > 0], torch.tensor(0.05))


@pytest.mark.parametrize("name", ["fgsm", "fgsm_rs", "pgd", "cw_inf", "mifgsm"])
def test_declared_evaluation_step_is_the_step_the_function_takes(name):
    """`AttackInfo.eval_step` is what `sweep validate` prints as the evaluation step: it must be
    the step the function takes when the file sets none. The first move of a deterministic
    start (x in the middle of [0, 1], a start given where the attack would draw one) is one
    step; with a step larger than eps it would be cut at the ball, so eps is large here."""
    info = ATTACKS.get(name)
    model = _linear()
    x, y = _batch()
    x = 0.4 + 0.2 * x
    rec = Recorder(model)
    eps, steps = 0.3, 4
    objective = info.objective(y)
    info.fn(rec, x, objective, eps=eps, steps=steps, start=x.clone())
    moved = (rec.seen[1] - rec.seen[0]).abs() if len(rec.seen) > 1 else None
    if moved is None:  # one-step attacks: the output is the one step from the start
        moved = (info.fn(model, x, objective, eps=eps, steps=steps, start=x.clone()) - x).abs()
    expected = info.eval_step(eps, steps)
    assert torch.allclose(moved[moved > 1e-9], torch.tensor(min(expected, eps)), atol=1e-6)
