"""AdvFunMatch and MTARD against hand computations of their formulas, their inner
maximisations, frozen teachers and (MTARD) the adaptive-weight rule and its checkpointed state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import LinearLogits, py_kl, py_softmax

from sweep.attacks import pgd
from sweep.methods.advfunmatch import AdvFunMatch
from sweep.methods.mtard import MTARD, adaptive_weight

EPS = 0.1


def attack(model, xx, obj):
    return pgd(model, xx, obj, eps=EPS, steps=5)


# --- hand computations (plain Python floats, independent of the methods' code) -------------


def _logits(x: torch.Tensor, w: torch.Tensor) -> list[list[float]]:
    """x.flatten(1) @ w by explicit sums."""
    rows = x.flatten(1).tolist()
    cols = w.t().tolist()
    return [[sum(a * b for a, b in zip(r, c, strict=True)) for c in cols] for r in rows]


def _hand_tkl(t_rows, s_rows, temp) -> float:
    """T^2 * batchmean KL(softmax(t/T) || softmax(s/T))."""
    total = 0.0
    for t_row, s_row in zip(t_rows, s_rows, strict=True):
        pt = py_softmax([v / temp for v in t_row])
        ps = py_softmax([v / temp for v in s_row])
        total += py_kl(pt, ps)
    return temp**2 * total / len(t_rows)


def _hand_ce(net, x, y) -> float:
    """Summed cross-entropy of a LinearLogits net, by hand."""
    with torch.no_grad():
        rows = _logits(x, net.w)
    return sum(-math.log(py_softmax(r)[k]) for r, k in zip(rows, y.tolist(), strict=True))


def _nets(seed: int, k_teachers: int = 1, d: int = 4, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    student = LinearLogits(torch.randn(d, c, generator=g))
    teachers = [LinearLogits(2 * torch.randn(d, c, generator=g)).eval() for _ in range(k_teachers)]
    return student, teachers


def _batch(seed: int, n: int = 6, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=g)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    y = torch.randint(0, c, (n,), generator=g)
    return x, x_adv, y


def _random_in_ball(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return (x + EPS * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)


def _assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor) -> None:
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def _no_grad(*nets) -> bool:
    return all(p.grad is None for m in nets for p in m.parameters())


# --- advfunmatch -------------------------------------------------------------------------


def test_advfunmatch_loss_matches_hand_computation_on_x_adv():
    temp = 3.0
    student, (teacher,) = _nets(0)
    x, x_adv, y = _batch(1)
    got = AdvFunMatch({"temperature": temp}).loss(student, [teacher], x, x_adv, y).item()
    with torch.no_grad():
        on_adv = _hand_tkl(_logits(x_adv, teacher.w), _logits(x_adv, student.w), temp)
        teacher_clean = _hand_tkl(_logits(x, teacher.w), _logits(x_adv, student.w), temp)
    assert got == pytest.approx(on_adv, rel=1e-5)
    assert got != pytest.approx(teacher_clean, rel=1e-3)  # both networks see x', not x


def test_advfunmatch_finds_mismatched_examples():
    temp = 2.0
    student, (teacher,) = _nets(2)
    x, _, y = _batch(3, n=16)

    def mismatch(xx):
        with torch.no_grad():
            return sum(
                py_kl(py_softmax([v / temp for v in t]), py_softmax([v / temp for v in s]))
                for t, s in zip(_logits(xx, teacher.w), _logits(xx, student.w), strict=True)
            )

    torch.manual_seed(0)
    x_adv = AdvFunMatch({"temperature": temp}).adversarial(student, [teacher], x, y, attack)
    _assert_in_ball(x_adv, x)
    assert mismatch(x_adv) > 1.2 * mismatch(x)
    assert mismatch(x_adv) > mismatch(_random_in_ball(x))
    assert _no_grad(student, teacher)  # the attack differentiates w.r.t. the input only
    assert not teacher.training


def test_advfunmatch_teacher_gets_no_gradient():
    student, (teacher,) = _nets(4)
    x, x_adv, y = _batch(5)
    AdvFunMatch({"temperature": 4.0}).loss(student, [teacher], x, x_adv, y).backward()
    assert teacher.w.grad is None
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0


def test_advfunmatch_describes_itself():
    d = AdvFunMatch.describe()
    assert d["teachers"] == "one" and d["needs_attack"]
    assert AdvFunMatch.space["temperature"].low == 1.0
    assert AdvFunMatch.space["temperature"].high == 8.0
    with pytest.raises(ValueError, match="temperature"):
        AdvFunMatch({})


# --- mtard -------------------------------------------------------------------------------

MT_HP = {"temperature": 2.0, "weight_lr": 0.1}


def _mtard_terms(student, clean, robust, x, x_adv, temp):
    """(T^2 KL(clean(x)||S(x)), T^2 KL(robust(x')||S(x'))) by hand."""
    with torch.no_grad():
        nat = _hand_tkl(_logits(x, clean.w), _logits(x, student.w), temp)
        adv = _hand_tkl(_logits(x_adv, robust.w), _logits(x_adv, student.w), temp)
    return nat, adv


def test_mtard_first_step_is_the_even_sum_of_both_terms():
    student, (clean, robust) = _nets(6, k_teachers=2)
    x, x_adv, y = _batch(7)
    m = MTARD(MT_HP)
    got = m.loss(student, [clean, robust], x, x_adv, y).item()
    nat, adv = _mtard_terms(student, clean, robust, x, x_adv, MT_HP["temperature"])
    assert nat > 0.01 and adv > 0.01 and abs(nat - adv) > 0.01
    assert got == pytest.approx(0.5 * nat + 0.5 * adv, rel=1e-5)
    assert m.w_nat == pytest.approx(0.5) and m.w_adv == pytest.approx(0.5)
    assert m.init_nat == pytest.approx(nat, rel=1e-5)
    assert m.init_adv == pytest.approx(adv, rel=1e-5)


def test_mtard_rule_by_hand():
    """w <- w - eta (w - r), r = l_nat / (l_nat + l_adv): the slower-learned term gains."""
    # nat still at its initial loss, adv halved: r = 1 / 1.5 = 2/3
    assert adaptive_weight(0.5, 1.0, 0.5, 0.1) == pytest.approx(0.5 - 0.1 * (0.5 - 2 / 3))
    assert adaptive_weight(0.5, 1.0, 0.5, 0.1) > 0.5
    assert adaptive_weight(0.5, 0.25, 1.0, 0.1) == pytest.approx(0.5 - 0.1 * (0.5 - 0.2))
    assert adaptive_weight(0.3, 1.0, 1.0, 1.0) == pytest.approx(0.5)  # eta 1: jumps to r


def test_mtard_weights_follow_the_rule_over_steps():
    temp, eta = MT_HP["temperature"], MT_HP["weight_lr"]
    student, (clean, robust) = _nets(8, k_teachers=2)
    m = MTARD(MT_HP)
    w = 0.5
    init = None
    for step in range(4):
        x, x_adv, y = _batch(10 + step)
        nat, adv = _mtard_terms(student, clean, robust, x, x_adv, temp)
        if init is None:
            init = (nat, adv)
        l_nat, l_adv = nat / init[0], adv / init[1]
        w = w - eta * (w - l_nat / (l_nat + l_adv))
        got = m.loss(student, [clean, robust], x, x_adv, y).item()
        assert m.w_nat == pytest.approx(w, rel=1e-5)
        assert m.w_adv == pytest.approx(1 - w, rel=1e-5)
        assert got == pytest.approx(w * nat + (1 - w) * adv, rel=1e-5)
    assert abs(m.w_nat - 0.5) > 1e-3  # the weights did move


def test_mtard_state_round_trips_through_a_checkpoint():
    student, (clean, robust) = _nets(9, k_teachers=2)
    m1 = MTARD(MT_HP)
    for step in range(3):
        x, x_adv, y = _batch(20 + step)
        m1.loss(student, [clean, robust], x, x_adv, y)
    buf = io.BytesIO()
    torch.save(m1.state_dict(), buf)
    buf.seek(0)
    m2 = MTARD(MT_HP)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    assert m2.w_nat == m1.w_nat and m2.init_nat == m1.init_nat and m2.init_adv == m1.init_adv
    x, x_adv, y = _batch(30)
    a = m1.loss(student, [clean, robust], x, x_adv, y).item()
    b = m2.loss(student, [clean, robust], x, x_adv, y).item()
    assert a == b and m1.w_nat == m2.w_nat
    fresh = MTARD(MT_HP)  # without the state the next step would differ (new initial losses)
    assert fresh.loss(student, [clean, robust], x, x_adv, y).item() != pytest.approx(a)


def test_mtard_fresh_state_dict_loads():
    m = MTARD(MT_HP)
    m.load_state_dict(MTARD(MT_HP).state_dict())
    assert m.w_nat == 0.5 and m.init_nat is None and m.init_adv is None
    m.load_state_dict({})  # a checkpoint from before the method had state
    assert m.w_nat == 0.5


def test_mtard_weight_lr_is_divided_like_the_learning_rate():
    m = MTARD(MT_HP)
    for epoch, factor in [(1, 1.0), (215, 1.0), (216, 0.1), (260, 0.1), (261, 0.01), (286, 1e-3)]:
        m.start_epoch(epoch, 300)
        assert m.lr == pytest.approx(MT_HP["weight_lr"] * factor)
    m.start_epoch(8, 10)  # 8 > 7.17: after the first decay point of a 10-epoch run
    assert m.lr == pytest.approx(MT_HP["weight_lr"] * 0.1)


def test_mtard_attack_ascends_the_student_cross_entropy():
    student, (clean, robust) = _nets(11, k_teachers=2)
    x, _, y = _batch(12, n=16)

    def ce(xx):
        return _hand_ce(student, xx, y)

    torch.manual_seed(0)
    x_adv = MTARD(MT_HP).adversarial(student, [clean, robust], x, y, attack)
    _assert_in_ball(x_adv, x)
    assert ce(x_adv) > 1.1 * ce(x) and ce(x_adv) > ce(_random_in_ball(x))
    assert _no_grad(student, clean, robust)


def test_mtard_teachers_get_no_gradient():
    student, (clean, robust) = _nets(13, k_teachers=2)
    x, x_adv, y = _batch(14)
    MTARD(MT_HP).loss(student, [clean, robust], x, x_adv, y).backward()
    assert clean.w.grad is None and robust.w.grad is None
    assert student.w.grad.abs().sum() > 0


def test_mtard_space_holds_the_papers_values():
    d = MTARD.describe()
    assert d["teachers"] == "clean+robust" and d["needs_attack"]
    assert MTARD.space["temperature"].low <= 1.0 <= MTARD.space["temperature"].high
    assert MTARD.space["weight_lr"].low <= 0.025 <= MTARD.space["weight_lr"].high
    assert MTARD.space["weight_lr"].type == "log_float"
