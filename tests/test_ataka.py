"""AT-AKA (our reconstruction of Hamidi & Ye 2024): SVGD particles on the student's CE (kernel,
median bandwidth and repulsion against hand computations; more spread than independent ascents
from the same starts; inside the ball), the amalgamation of every teacher on every particle, and
the loss against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearLogits, py_kl, py_softmax

from sweep.attacks import Ball
from sweep.methods.ataka import (
    ATAKA,
    amalgamate,
    median_bandwidth,
    rbf_kernel,
    svgd_direction,
    svgd_particles,
)
from sweep.models import build_model
from sweep.training import TrainAttack

EPS = 0.1
ATTACK = TrainAttack("pgd", EPS, steps=5, step_size=None, norm="linf")


def _nets(seed: int, k_teachers: int = 1, d: int = 4, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    student = LinearLogits(torch.randn(d, c, generator=g))
    teachers = [LinearLogits(2 * torch.randn(d, c, generator=g)).eval() for _ in range(k_teachers)]
    for t in teachers:
        t.requires_grad_(False)
    return student, teachers


def _batch(seed: int, n: int = 6, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def _particles(x: torch.Tensor, m: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(x + EPS * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1) for _ in range(m)]


def _mean_pairwise_distance(p: torch.Tensor, x: torch.Tensor) -> float:
    d = (p - x).flatten(2).transpose(0, 1)  # (B, M, D)
    dist = torch.cdist(d, d)
    m = p.shape[0]
    return (dist.sum() / (dist.shape[0] * m * (m - 1))).item()


# --- the kernel, by hand ----------------------------------------------------------------------


def test_median_bandwidth_on_hand_made_sets():
    # 1-D particles 0, 1, 3: squared distances 0,0,0,1,1,4,4,9,9 -> median 1, h = 1 / log 4
    d = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=torch.float64)
    sq = torch.cdist(d, d).pow(2)
    assert median_bandwidth(sq).item() == pytest.approx(1 / math.log(4), rel=1e-12)
    # two particles at squared distance 8: entries 0,0,8,8 -> median 4 (interpolated, numpy's)
    d2 = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]], dtype=torch.float64)
    sq2 = torch.cdist(d2, d2).pow(2)
    assert median_bandwidth(sq2).item() == pytest.approx(4 / math.log(3), rel=1e-12)


def _hand_kernel(points: list[list[float]]):
    """(k[j][i], repulsion[i]) by explicit sums: k = exp(-|a - b|^2 / h), h from the median of
    the full matrix of squared distances, repulsion_i = sum_j 2 (d_i - d_j) / h * k_ji."""
    m = len(points)
    sq = [[sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) for q in points] for p in points]
    flat = sorted(v for row in sq for v in row)
    mid = len(flat) // 2
    med = flat[mid] if len(flat) % 2 else (flat[mid - 1] + flat[mid]) / 2
    h = med / math.log(m + 1)
    k = [[math.exp(-sq[j][i] / h) for i in range(m)] for j in range(m)]
    rep = [
        [sum(2 * (points[i][c] - points[j][c]) / h * k[j][i] for j in range(m)) for c in range(2)]
        for i in range(m)
    ]
    return k, rep


def test_kernel_and_its_repulsion_match_hand_computation():
    pts = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    k_hand, rep_hand = _hand_kernel(pts)
    k, rep = rbf_kernel(torch.tensor([pts], dtype=torch.float64))
    assert torch.allclose(k[0], torch.tensor(k_hand, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(rep[0], torch.tensor(rep_hand, dtype=torch.float64), rtol=1e-12)
    # the repulsion pushes particle 0 away from the others (both coordinates negative)
    assert rep[0, 0, 0] < 0 and rep[0, 0, 1] < 0


def test_svgd_direction_matches_hand_computation():
    pts = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    score = [[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0]]
    k, rep = _hand_kernel(pts)
    expected = [
        [(sum(k[j][i] * score[j][c] for j in range(3)) + rep[i][c]) / 3 for c in range(2)]
        for i in range(3)
    ]
    delta = torch.tensor([pts], dtype=torch.float64)
    s = torch.tensor([score], dtype=torch.float64)
    got = svgd_direction(delta, s)
    assert torch.allclose(got[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert torch.equal(svgd_direction(delta, s, repulse=False), s)


# --- the particles ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_svgd_particles_are_more_spread_than_independent_ascents_from_the_same_starts(norm):
    torch.manual_seed(0)
    student = build_model("small_cnn", in_channels=1, num_classes=10, mean=(0.5,), std=(0.25,))
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    eps = 0.5 if norm == "l2" else EPS
    ball = Ball(eps=eps, norm=norm, steps=10, step_size=eps / 4)
    starts = ball.starts(x, 4)
    svgd = svgd_particles(student, x, y, 4, ball, starts=starts)
    alone = svgd_particles(student, x, y, 4, ball, starts=starts, repulse=False)
    assert _mean_pairwise_distance(svgd, x) > 1.5 * _mean_pairwise_distance(alone, x)


def test_independent_ascents_climb_the_students_cross_entropy():
    """With the repulsion off, each particle is a PGD run on the student's CE."""
    student, _ = _nets(1, d=16, c=4)
    student.w.data *= 3
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    ball = Ball.of(ATTACK, "t")
    torch.manual_seed(1)
    starts = ball.starts(x, 3)
    alone = svgd_particles(student, x, y, 3, ball, starts=starts, repulse=False)
    with torch.no_grad():

        def ce(p):
            return F.cross_entropy(student(p.flatten(0, 1)), y.repeat(3)).item()

        assert ce(alone) > ce(starts) + 0.1


def test_particles_stay_in_the_ball_and_the_data_range():
    student, _ = _nets(2, d=4)
    x, y = _batch(2, n=8)
    x[:2] = 1.0  # on the data range's edge
    torch.manual_seed(2)
    parts = ATAKA({"temperature": 2.0}).adversarial(student, [], x, y, ATTACK)
    assert len(parts) == ATAKA.n_particles
    for p in parts:
        assert p.shape == x.shape
        assert (p - x).abs().max() <= EPS + 1e-6
        assert p.min() >= 0 and p.max() <= 1
    assert not torch.equal(parts[0], parts[1])


def test_adversarial_leaves_the_students_mode_and_statistics():
    torch.manual_seed(3)
    student = build_model("small_cnn", in_channels=1, num_classes=10, mean=(0.5,), std=(0.25,))
    student.train()
    before = [b.clone() for b in student.buffers()]
    x = torch.rand(4, 1, 8, 8)
    ATAKA({"temperature": 2.0}).adversarial(
        student, [], x, torch.zeros(4, dtype=torch.long), ATTACK
    )
    assert student.training
    assert all(torch.equal(a, b) for a, b in zip(before, student.buffers(), strict=True))


def test_a_plain_attack_function_is_refused_with_what_is_needed():
    student, _ = _nets(4)
    x, y = _batch(4)
    with pytest.raises(TypeError, match="TrainAttack"):
        ATAKA({"temperature": 2.0}).adversarial(student, [], x, y, lambda m, xx, o: xx)


# --- amalgamation and the loss ----------------------------------------------------------------


def test_amalgamation_weights_sum_to_one_and_favour_the_confident_teacher():
    g = torch.Generator().manual_seed(5)
    z = [torch.randn(7, 4, generator=g) * 3 for _ in range(3)]
    y = torch.randint(0, 4, (7,), generator=g)
    w, target = amalgamate(z, y)
    assert w.shape == (3, 7)
    assert torch.allclose(w.sum(0), torch.ones(7), atol=1e-6)
    conf = torch.stack([F.softmax(zk, 1)[torch.arange(7), y] for zk in z])
    assert torch.equal(w.argmax(0), conf.argmax(0))
    assert torch.allclose(target, sum(w[k].unsqueeze(1) * z[k] for k in range(3)), atol=1e-6)


def test_identical_teachers_give_that_teachers_distribution():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 3, generator=g)
    w, target = amalgamate([z, z, z], torch.tensor([0, 1, 2, 0, 1]))
    assert torch.allclose(w, torch.full_like(w, 1 / 3))
    assert torch.allclose(target, z, atol=1e-6)


def test_loss_matches_hand_amalgamation_over_every_teacher_and_particle():
    """Per particle j: the teachers' logits on x_j weighted by their true-label probability on
    x_j; the student's T^2 * KL to that target on x_j, averaged over particles and examples."""
    temp = 2.0
    student, (t1, t2) = _nets(7, k_teachers=2)
    x, y = _batch(7)
    parts = _particles(x, 3, seed=7)
    got = ATAKA({"temperature": temp}).loss(student, [t1, t2], x, parts, y).item()
    total, weights = 0.0, []
    with torch.no_grad():
        for p in parts:
            z1, z2, zs = t1(p).tolist(), t2(p).tolist(), student(p).tolist()
            for r1, r2, rs, k in zip(z1, z2, zs, y.tolist(), strict=True):
                c1, c2 = py_softmax(r1)[k], py_softmax(r2)[k]
                a1, a2 = c1 / (c1 + c2), c2 / (c1 + c2)
                weights.append(a1)
                target = [a1 * u + a2 * v for u, v in zip(r1, r2, strict=True)]
                pt = py_softmax([v / temp for v in target])
                ps = py_softmax([v / temp for v in rs])
                total += temp**2 * py_kl(pt, ps)
    expected = total / (len(parts) * len(x))
    assert max(weights) - min(weights) > 0.1  # the weights are not uniform on this batch
    assert got == pytest.approx(expected, rel=1e-5)


def test_teachers_get_no_gradient_and_the_student_does():
    student, teachers = _nets(8, k_teachers=3)
    for t in teachers:
        t.requires_grad_(True)
    x, y = _batch(8)
    ATAKA({"temperature": 4.0}).loss(student, teachers, x, _particles(x, 2, 8), y).backward()
    assert all(t.w.grad is None for t in teachers)
    assert student.w.grad.abs().sum() > 0


def test_particles_must_be_shaped_like_x():
    student, teachers = _nets(9, k_teachers=2)
    x, y = _batch(9)
    with pytest.raises(ValueError, match="shaped like x"):
        ATAKA({"temperature": 4.0}).loss(student, teachers, x, [x[:3]], y)


def test_declares_an_ensemble_and_its_fidelity():
    d = ATAKA.describe()
    assert d["teachers"] == "ensemble" and d["needs_attack"]
    assert set(ATAKA.space) == {"temperature"} and ATAKA.paper_default == {}
    assert d["fidelity"]["checked"] == "reconstruction"
    assert "2405.13324" in d["fidelity"]["source"]
