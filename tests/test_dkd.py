"""DKD (Zhao et al. 2022) against hand computations and the paper's KD decomposition (eq. 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearLogits, py_kl, py_softmax
from torch import nn

from sweep.losses import soft_kl
from sweep.methods.dkd import DKD

PAPER_HP = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0}


class _Logits(nn.Module):
    """A 'network' that ignores its input and returns fixed logits (from a parameter, so
    gradients to it are observable). `* 1.0` makes the output a computed tensor, as a real
    network's is: returned bare, the parameter itself would carry grad even under no_grad."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(z.clone())

    def forward(self, x):
        return self.z * 1.0


def _hand_terms(s_row, t_row, label, temp):
    """(TCKD, NCKD) of one example without T^2, from the paper's definitions."""
    ps = py_softmax([v / temp for v in s_row])
    pt = py_softmax([v / temp for v in t_row])
    b_s, b_t = [ps[label], 1 - ps[label]], [pt[label], 1 - pt[label]]
    # p^: the non-target probabilities renormalised by their total mass 1 - p_target
    hat_s = [p / (1 - ps[label]) for i, p in enumerate(ps) if i != label]
    hat_t = [p / (1 - pt[label]) for i, p in enumerate(pt) if i != label]
    return py_kl(b_t, b_s), py_kl(hat_t, hat_s)


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.5]]
T = [[2.0, -0.5, 1.0], [1.0, 0.5, 3.0]]  # non-target shapes differ from S's
Y = [0, 2]


def _loss(hp, s, t, y):
    x = torch.zeros(len(y), 1)
    student, teacher = _Logits(torch.tensor(s)), _Logits(torch.tensor(t)).eval()
    return DKD(hp).loss(student, [teacher], x, x, torch.tensor(y))


def test_dkd_loss_matches_hand_computation():
    temp, a, b = 4.0, 1.0, 8.0
    ce = tckd = nckd = 0.0
    for s_row, t_row, label in zip(S, T, Y, strict=True):
        ce -= math.log(py_softmax(s_row)[label])
        tc, nc = _hand_terms(s_row, t_row, label, temp)
        tckd, nckd = tckd + tc, nckd + nc
    assert tckd > 0.01 and nckd > 0.01  # neither term is vacuous on this example
    n = len(Y)
    expected = ce / n + temp**2 * (a * tckd / n + b * nckd / n)
    assert _loss(PAPER_HP, S, T, Y).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (0.0, 1.0)])
def test_each_term_alone_matches_its_hand_value(alpha, beta):
    """TCKD and NCKD separately, so one cannot hide an error in the other."""
    temp = 2.0
    ce = sum(-math.log(py_softmax(r)[k]) for r, k in zip(S, Y, strict=True)) / len(Y)
    terms = [_hand_terms(s, t, k, temp) for s, t, k in zip(S, T, Y, strict=True)]
    tckd = sum(tc for tc, _ in terms) / len(Y)
    nckd = sum(nc for _, nc in terms) / len(Y)
    expected = ce + temp**2 * (alpha * tckd + beta * nckd)
    got = _loss({"temperature": temp, "alpha": alpha, "beta": beta}, S, T, Y)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_nckd_ignores_the_target_logit():
    """NCKD sees only the renormalised non-target classes: moving the target logit of either
    network changes TCKD but not NCKD."""
    hp = {"temperature": 3.0, "alpha": 0.0, "beta": 1.0}
    s2 = [
        [v + (5.0 if i == k else 0.0) for i, v in enumerate(r)] for r, k in zip(S, Y, strict=True)
    ]
    t2 = [
        [v - (3.0 if i == k else 0.0) for i, v in enumerate(r)] for r, k in zip(T, Y, strict=True)
    ]
    ce = F.cross_entropy(torch.tensor(S), torch.tensor(Y))
    ce2 = F.cross_entropy(torch.tensor(s2), torch.tensor(Y))
    nckd = _loss(hp, S, T, Y) - ce
    nckd2 = _loss(hp, s2, t2, Y) - ce2
    assert nckd.item() > 0
    assert nckd2.item() == pytest.approx(nckd.item(), rel=1e-5)


def test_alpha_beta_zero_is_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    y = torch.randint(0, 5, (6,))
    got = _loss({"temperature": 4.0, "alpha": 0.0, "beta": 0.0}, s.tolist(), t.tolist(), y.tolist())
    assert got.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_kd_decomposes_into_tckd_plus_weighted_nckd():
    """Zhao et al. eq. 2, per example: KD = TCKD + (1 - p_t^teacher) * NCKD, all at T with T^2
    on every term (the factor cancels)."""
    torch.manual_seed(0)
    temp = 4.0
    s, t = torch.randn(8, 10, dtype=torch.float64) * 3, torch.randn(8, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,))
    for i in range(8):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        x = torch.zeros(1, 1)
        student, teacher = _Logits(si), _Logits(ti).eval()
        ce = F.cross_entropy(si, yi)

        def term(alpha, beta, student=student, teacher=teacher, x=x, yi=yi, ce=ce):
            hp = {"temperature": temp, "alpha": alpha, "beta": beta}
            return (DKD(hp).loss(student, [teacher], x, x, yi) - ce).item()

        tckd, nckd = term(1.0, 0.0), term(0.0, 1.0)
        kd = temp**2 * soft_kl(si, ti, temp).item()
        p_target = F.softmax(ti / temp, dim=1)[0, yi].item()
        assert kd == pytest.approx(tckd + (1 - p_target) * nckd, rel=1e-9)


def test_teacher_and_student_both_see_the_training_input():
    torch.manual_seed(1)
    student, teacher = LinearLogits(torch.randn(4, 3)), LinearLogits(torch.randn(4, 3)).eval()
    x = torch.rand(5, 1, 2, 2)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 3, (5,))
    got = DKD(PAPER_HP).loss(student, [teacher], x, x_adv, y).item()
    with torch.no_grad():
        on_adv = _loss(PAPER_HP, student(x_adv).tolist(), teacher(x_adv).tolist(), y.tolist())
        on_clean = _loss(PAPER_HP, student(x_adv).tolist(), teacher(x).tolist(), y.tolist())
    assert got == pytest.approx(on_adv.item(), rel=1e-6)
    assert got != pytest.approx(on_clean.item(), rel=1e-4)


def test_teacher_gets_no_gradient():
    student, teacher = _Logits(torch.tensor(S)), _Logits(torch.tensor(T)).eval()
    x = torch.zeros(2, 1)
    DKD(PAPER_HP).loss(student, [teacher], x, x, torch.tensor(Y)).backward()
    assert teacher.z.grad is None
    assert student.z.grad is not None and student.z.grad.abs().sum() > 0


def test_confident_logits_stay_finite():
    """p_target == 1 in float32 would make log(1 - p_target) = -inf in the authors' code."""
    s = torch.tensor([[200.0, 0.0, -50.0]])
    t = torch.tensor([[150.0, 10.0, 0.0]])
    student, teacher = _Logits(s), _Logits(t).eval()
    x = torch.zeros(1, 1)
    loss = DKD({"temperature": 1.0, "alpha": 1.0, "beta": 8.0}).loss(
        student, [teacher], x, x, torch.tensor([0])
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.z.grad).all()


def test_space_covers_the_paper_setting_and_beta_is_required():
    for k, v in PAPER_HP.items():
        assert DKD.space[k].low <= v <= DKD.space[k].high
    with pytest.raises(ValueError, match="beta"):
        DKD({"temperature": 4.0, "alpha": 1.0})


def test_kd_terms_ramp_in_linearly_over_the_papers_warmup_fraction():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    student = LinearLogits(torch.randn(5, 5, generator=g))
    teacher = LinearLogits(torch.randn(5, 5, generator=g)).eval()
    m = DKD({"temperature": 4.0, "alpha": 1.0, "beta": 8.0})
    ce = F.cross_entropy(student(x), y).item()
    whole = m.loss(student, [teacher], x, x, y).item()
    assert whole - ce > 1e-3  # the KD terms are not zero here
    m.start_epoch(6, 240)  # the warm-up is 20 of 240 epochs: factor 6/20
    part = m.loss(student, [teacher], x, x, y).item()
    assert part - ce == pytest.approx(0.3 * (whole - ce), rel=1e-5)
    m.start_epoch(20, 240)
    assert m.loss(student, [teacher], x, x, y).item() == pytest.approx(whole, rel=1e-6)
    m.start_epoch(1, 1)  # a one-epoch run is not held back
    assert m.loss(student, [teacher], x, x, y).item() == pytest.approx(whole, rel=1e-6)
