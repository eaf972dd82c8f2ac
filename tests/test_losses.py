"""Teacher losses and student objectives against hand computations (DESIGN §4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearLogits, py_softmax

from sweep.losses import soft_kl
from sweep.methods import METHODS


def test_soft_kl_is_batchmean_kl_of_teacher_to_student_at_temperature():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.4, 0.6]])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    temp = 2.0
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ps = py_softmax([v / temp for v in srow])
        pt = py_softmax([v / temp for v in trow])
        expected += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
    assert soft_kl(s, t, temp).item() == pytest.approx(expected / 2, rel=1e-5)
    assert soft_kl(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def _nets():
    torch.manual_seed(1)
    student = LinearLogits(torch.randn(4, 3))
    teacher = LinearLogits(torch.randn(4, 3)).eval()
    x = torch.rand(5, 1, 2, 2)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 3, (5,))
    return student, teacher, x, x_adv, y


def test_kd_loss_follows_hinton():
    student, teacher, x, x_adv, y = _nets()
    hp = {"temperature": 3.0, "alpha": 0.7}
    got = METHODS.get("kd")(hp).loss(student, [teacher], x, x_adv, y)
    s, t = student(x_adv), teacher(x_adv)
    kl = (F.softmax(t / 3, 1) * (F.log_softmax(t / 3, 1) - F.log_softmax(s / 3, 1))).sum(1).mean()
    expected = 0.7 * 9 * kl + 0.3 * F.cross_entropy(s, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ard_loss_uses_clean_teacher_adversarial_student_and_clean_ce():
    student, teacher, x, x_adv, y = _nets()
    hp = {"temperature": 2.0, "alpha": 0.6}
    got = METHODS.get("ard")(hp).loss(student, [teacher], x, x_adv, y)
    s_adv, t_clean = student(x_adv), teacher(x)
    kl = (
        (F.softmax(t_clean / 2, 1) * (F.log_softmax(t_clean / 2, 1) - F.log_softmax(s_adv / 2, 1)))
        .sum(1)
        .mean()
    )
    expected = 0.6 * 4 * kl + 0.4 * F.cross_entropy(student(x), y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # and it is not KD on adversarial inputs
    kd = METHODS.get("kd")(hp).loss(student, [teacher], x, x_adv, y)
    assert kd.item() != pytest.approx(got.item(), rel=1e-4)


def test_ce_method_is_cross_entropy_on_training_input():
    student, _, x, x_adv, y = _nets()
    got = METHODS.get("ce")({}).loss(student, [], x, x_adv, y)
    assert got.item() == pytest.approx(F.cross_entropy(student(x_adv), y).item(), rel=1e-6)


def test_teacher_gets_no_gradient_from_student_loss():
    student, teacher, x, x_adv, y = _nets()
    loss = METHODS.get("kd")({"temperature": 2.0, "alpha": 0.5}).loss(
        student, [teacher], x, x_adv, y
    )
    loss.backward()
    assert teacher.w.grad is None
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0


def test_method_without_its_hyperparameters_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        METHODS.get("kd")({"alpha": 0.5})
