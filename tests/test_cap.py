"""CAP (confined adversarial polytopes, our reconstruction of Hamidi & Ye 2024): the particles
climb to corners of the output polytope and stay in the ball; the loss against a hand
computation; lambda = 0 is plain CE; what the method declares."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearLogits, py_softmax

from sweep.attacks import Ball
from sweep.methods.cap import (
    CAP,
    cap_loss,
    corner_particles,
    output_directions,
    polytope_spread,
)
from sweep.models import build_model
from sweep.training import TrainAttack

EPS = 0.1
ATTACK = TrainAttack("pgd", EPS, steps=5, step_size=None, norm="linf")


def _net_and_batch(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    student = LinearLogits(3 * torch.randn(16, 4, generator=g))
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return student, x, y


def _spread(model, x, particles) -> float:
    with torch.no_grad():
        n = particles.shape[0]
        logits = model(particles.flatten(0, 1)).view(n, len(x), -1)
        return polytope_spread(logits, model(x)).item()


def _pairwise_output_distance(model, particles) -> float:
    """Mean over examples and particle pairs of ||p(x_a) - p(x_b)||_2."""
    with torch.no_grad():
        n = particles.shape[0]
        p = F.softmax(model(particles.flatten(0, 1)), 1).view(n, particles.shape[1], -1)
        d = torch.cdist(p.transpose(0, 1), p.transpose(0, 1))  # [B, N, N]
        return (d.sum() / (d.shape[0] * n * (n - 1))).item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_particles_end_farther_from_the_centre_than_their_random_starts(norm):
    torch.manual_seed(0)
    student, x, _ = _net_and_batch()
    ball = Ball(eps=0.3 if norm == "l2" else EPS, norm=norm, steps=10, step_size=0.03)
    v = output_directions(4, len(x), 4, x)
    starts = ball.starts(x, 4)
    particles = corner_particles(student, x, v, ball, starts=starts)
    assert _spread(student, x, particles) > 3 * _spread(student, x, starts)
    # each climbs its own direction: the corners reached differ from each other
    assert _pairwise_output_distance(student, particles) > 2 * _pairwise_output_distance(
        student, starts
    )


def test_particles_stay_in_the_ball_and_the_data_range():
    torch.manual_seed(1)
    student, x, _ = _net_and_batch(seed=1)
    x[:3] = 0.0  # examples on the data range's edge: clipping matters
    particles = corner_particles(
        student, x, output_directions(5, len(x), 4, x), Ball.of(ATTACK, "t")
    )
    assert particles.shape == (5, *x.shape)
    assert (particles - x).abs().max() <= EPS + 1e-6
    assert particles.min() >= 0 and particles.max() <= 1


def test_directions_are_centred_unit_vectors():
    torch.manual_seed(2)
    v = output_directions(3, 7, 5, torch.zeros(1))
    assert v.shape == (3, 7, 5)
    assert torch.allclose(v.sum(2), torch.zeros(3, 7), atol=1e-6)
    assert torch.allclose(v.norm(dim=2), torch.ones(3, 7), atol=1e-6)


def test_loss_matches_hand_computation():
    """CE(S(x), y) + lambda * mean over particles and examples of sum_c (p_n,c - p_c)^2."""
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    parts = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    lam = 2.5
    ce = (
        sum(-math.log(py_softmax(r)[k]) for r, k in zip(clean.tolist(), y.tolist(), strict=True))
        / 3
    )
    spread = 0.0
    for n in range(2):
        for i in range(3):
            p, q = py_softmax(parts[n, i].tolist()), py_softmax(clean[i].tolist())
            spread += sum((a - b) ** 2 for a, b in zip(p, q, strict=True))
    expected = ce + lam * spread / 6
    assert spread / 6 > 1e-2  # the penalty is not vacuous on these logits
    assert cap_loss(clean, parts, y, lam).item() == pytest.approx(expected, rel=1e-12)


def test_method_loss_feeds_the_particles_and_x_to_the_student():
    student, x, y = _net_and_batch(seed=4, n=5)
    g = torch.Generator().manual_seed(4)
    parts = [(x + 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1) for _ in range(3)]
    got = CAP({"polytope_weight": 4.0}).loss(student, [], x, parts, y)
    with torch.no_grad():
        p_logits = torch.stack([student(p) for p in parts])
        expected = cap_loss(student(x), p_logits, y, 4.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_zero_weight_is_cross_entropy():
    student, x, y = _net_and_batch(seed=5, n=6)
    torch.manual_seed(5)
    parts = CAP({"polytope_weight": 0.0}).adversarial(student, [], x, y, ATTACK)
    got = CAP({"polytope_weight": 0.0}).loss(student, [], x, parts, y).item()
    assert got == pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-7)
    # and a positive weight adds a positive penalty on the same particles
    assert CAP({"polytope_weight": 5.0}).loss(student, [], x, parts, y).item() > got + 1e-3


def test_adversarial_returns_n_particles_in_the_ball_with_the_student_mode_restored():
    torch.manual_seed(6)
    student = build_model("small_cnn", in_channels=1, num_classes=10, mean=(0.5,), std=(0.25,))
    student.train()
    x = torch.rand(4, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    before = [b.clone() for b in student.buffers()]
    parts = CAP({"polytope_weight": 1.0}).adversarial(student, [], x, y, ATTACK)
    assert len(parts) == CAP.n_particles and all(p.shape == x.shape for p in parts)
    assert all((p - x).abs().max() <= EPS + 1e-6 for p in parts)
    assert student.training  # mode restored
    assert all(
        torch.equal(a, b) for a, b in zip(before, student.buffers(), strict=True)
    )  # BN untouched
    assert not torch.equal(parts[0], parts[1])


def test_gradient_reaches_the_student_through_the_penalty():
    student, x, y = _net_and_batch(seed=7, n=6)
    torch.manual_seed(7)
    parts = CAP({"polytope_weight": 5.0}).adversarial(student, [], x, y, ATTACK)
    CAP({"polytope_weight": 5.0}).loss(student, [], x, parts, y).backward()
    g_full = student.w.grad.clone()
    student.w.grad = None
    F.cross_entropy(student(x), y).backward()
    assert not torch.allclose(g_full, student.w.grad)


def test_a_plain_attack_function_is_refused_with_what_is_needed():
    student, x, y = _net_and_batch(seed=8, n=2)
    with pytest.raises(TypeError, match="TrainAttack"):
        CAP({"polytope_weight": 1.0}).adversarial(student, [], x, y, lambda m, xx, o: xx)


def test_step_size_defaults_to_a_quarter_of_eps():
    assert Ball.of(ATTACK, "cap").step_size == pytest.approx(EPS / 4)
    assert Ball.of(TrainAttack("pgd", EPS, 3, 0.01, "l2"), "cap").step_size == 0.01


def test_declares_one_weight_and_its_fidelity():
    assert CAP.teacher_set == "none" and CAP.needs_attack and CAP.features is None
    assert set(CAP.space) == {"polytope_weight"}
    assert CAP.paper_default == {}
    d = CAP.describe()["fidelity"]
    assert d["checked"] == "reconstruction" and "2401.07991" in d["source"]
    with pytest.raises(ValueError, match="polytope_weight"):
        CAP({})
