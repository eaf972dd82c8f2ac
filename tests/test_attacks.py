"""Attack mechanics: formulas, eps-ball and data range, the model left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweep.attacks import ce_objective, run_attack
from sweep.evaluate import accuracy, evaluate_suite
from sweep.models import build_model
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


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_adversarial_examples_stay_in_eps_ball_and_data_range(name):
    model = _model()
    x, y = _batch()
    eps = 0.2
    x_adv = run_attack(name, model, x, ce_objective(y), eps=eps, steps=7)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


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


def test_attack_runs_model_in_eval_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x.flatten(1)[:, :10]

    probe = Probe().train()
    x, y = _batch()
    run_attack("pgd", probe, x, ce_objective(y), eps=0.1, steps=3)
    assert seen and not any(seen)
    assert probe.training
