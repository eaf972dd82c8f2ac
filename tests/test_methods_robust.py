"""PGD-AT, TRADES, IAD and RSLAD against hand computations of the papers' formulas, their inner
maximisations, and the teacher staying frozen (DESIGN §4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearLogits, Recorder, py_kl, py_softmax
from torch import nn

from sweep.attacks import ATTACKS, eval_mode, input_grad, pgd
from sweep.methods.ard import ARD
from sweep.methods.iad import IAD
from sweep.methods.pgd_at import PGDAT
from sweep.methods.rslad import RSLAD
from sweep.methods.trades import TRADES
from sweep.models import build_model
from sweep.training import TrainAttack

EPS = 0.1
PAPER_HP = {
    PGDAT: {},
    TRADES: {"beta": 6.0},
    IAD: {"temperature": 1.0, "alpha": 1.0, "beta": 0.1, "warmup_frac": 0.3},
    RSLAD: {"adv_weight": 5 / 6},
}


def attack(model, xx, obj, start=None):
    return pgd(model, xx, obj, eps=EPS, steps=5, start=start)


# --- hand arithmetic, independent of torch's softmax / kl_div ---------------------------------


def _ce(row, label):
    return -math.log(py_softmax(row)[label])


def _rows(net, x):
    with torch.no_grad():
        return net(x).tolist()


def _nets(seed=0, n=6):
    torch.manual_seed(seed)
    student = LinearLogits(torch.randn(16, 3))
    teacher = LinearLogits(torch.randn(16, 3)).eval()
    x = 0.2 + 0.6 * torch.rand(n, 1, 4, 4)
    # far from x (not an eps-ball point): so that swapping x and x' in a formula shows
    x_adv = (x + 0.3 * torch.randn_like(x).sign()).clamp(0, 1)
    y = torch.randint(0, 3, (n,))
    return student, teacher, x, x_adv, y


def _in_ball(x_adv, x):
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def _random_in_ball(x, k=8):
    return [(x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1) for _ in range(k)]


def _check_ascent(objective, x, x_adv):
    """The attack's point beats the clean input and every random point of the ball."""
    _in_ball(x_adv, x)
    at_adv = objective(x_adv)
    assert at_adv > objective(x) + 1e-3
    assert all(at_adv > objective(r) for r in _random_in_ball(x))


# --- pgd_at ------------------------------------------------------------------------------------


def test_pgd_at_loss_is_ce_on_the_adversarial_input():
    student, _, x, x_adv, y = _nets()
    got = PGDAT({}).loss(student, [], x, x_adv, y).item()
    s_adv, s_clean = _rows(student, x_adv), _rows(student, x)
    expected = sum(_ce(r, k) for r, k in zip(s_adv, y.tolist(), strict=True)) / len(y)
    on_clean = sum(_ce(r, k) for r, k in zip(s_clean, y.tolist(), strict=True)) / len(y)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(on_clean, rel=1e-3)


def test_pgd_at_inner_max_raises_the_student_ce():
    student, _, x, _, y = _nets(1)
    x_adv = PGDAT({}).adversarial(student, [], x, y, attack)

    def ce(xx):
        return F.cross_entropy(student(xx), y, reduction="sum").item()

    _check_ascent(ce, x, x_adv)
    assert student.w.grad is None  # the attack touches no parameter


# --- trades ------------------------------------------------------------------------------------


def _trades_hand(student, x, x_adv, y, beta):
    s_clean, s_adv = _rows(student, x), _rows(student, x_adv)
    n = len(y)
    ce = sum(_ce(r, k) for r, k in zip(s_clean, y.tolist(), strict=True)) / n
    kl = sum(py_kl(py_softmax(c), py_softmax(a)) for c, a in zip(s_clean, s_adv, strict=True)) / n
    return ce, kl


@pytest.mark.parametrize("beta", [6.0, 1.0])
def test_trades_loss_matches_hand_computation(beta):
    student, _, x, x_adv, y = _nets()
    ce, kl = _trades_hand(student, x, x_adv, y, beta)
    assert kl > 0.01  # the robust term is not vacuous here
    got = TRADES({"beta": beta}).loss(student, [], x, x_adv, y).item()
    assert got == pytest.approx(ce + beta * kl, rel=1e-5)


def test_trades_kl_direction_is_clean_to_adversarial():
    """KL(S(x) || S(x')), not KL(S(x') || S(x)): the two differ on this example."""
    student, _, x, x_adv, y = _nets()
    ce, _ = _trades_hand(student, x, x_adv, y, 1.0)
    s_clean, s_adv = _rows(student, x), _rows(student, x_adv)
    reverse = sum(py_kl(py_softmax(a), py_softmax(c)) for c, a in zip(s_clean, s_adv, strict=True))
    got = TRADES({"beta": 1.0}).loss(student, [], x, x_adv, y).item()
    assert got != pytest.approx(ce + reverse / len(y), rel=1e-3)


def test_trades_gradient_flows_through_both_sides_of_the_kl():
    """As in the authors' code, S(x) is not detached in the outer loss."""
    student, _, x, x_adv, y = _nets()
    TRADES({"beta": 6.0}).loss(student, [], x, x_adv, y).backward()
    got = student.w.grad.clone()
    w = student.w.detach().clone().requires_grad_(True)
    zc, za = x.flatten(1) @ w, x_adv.flatten(1) @ w
    pc = zc.softmax(1)
    kl = (pc * (pc.log() - za.softmax(1).log())).sum(1).mean()
    (F.cross_entropy(zc, y) + 6.0 * kl).backward()
    assert torch.allclose(got, w.grad, rtol=1e-4, atol=1e-6)


def test_trades_inner_max_raises_kl_from_the_clean_student():
    student, _, x, _, y = _nets(2)
    x_adv = TRADES({"beta": 6.0}).adversarial(student, [], x, y, attack)
    with torch.no_grad():
        p_clean = student(x).softmax(1)

    def kl(xx):
        with torch.no_grad():
            q = student(xx).softmax(1)
        return (p_clean * (p_clean.log() - q.log())).sum().item()

    assert kl(x) == pytest.approx(0.0, abs=1e-6)
    _check_ascent(kl, x, x_adv)
    assert student.w.grad is None


def test_trades_inner_target_is_the_student_in_eval_mode():
    """The fixed p_S(x) comes from the student in eval() (the attack's mode): with dropout, a
    train-mode target would be random and change x'."""
    torch.manual_seed(3)
    student = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x = 0.2 + 0.6 * torch.rand(5, 1, 4, 4)
    y = torch.randint(0, 3, (5,))
    torch.manual_seed(7)
    got = TRADES({"beta": 6.0}).adversarial(student, [], x, y, attack)
    assert student.training and student[1].training  # modes restored
    student.eval()
    with torch.no_grad():
        log_p = student(x).log_softmax(1)
    student.train()

    def objective(logits):
        return (log_p.exp() * (log_p - logits.log_softmax(1))).sum()

    torch.manual_seed(7)
    expected = pgd(student, x, objective, eps=EPS, steps=5, start=x + 0.001 * torch.randn_like(x))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_trades_search_starts_at_x_plus_a_tiny_gaussian_with_every_attack(name):
    """The authors' start x + 0.001 * N(0, 1) reaches each attack (FGSM and MI-FGSM would
    otherwise start at x, where the KL is flat); the result stays in the ball and [0, 1]."""
    student, _, x, _, y = _nets(4)
    rec = Recorder(student)
    train_attack = TrainAttack(name, EPS, steps=3, step_size=EPS / 4)
    torch.manual_seed(11)
    x_adv = TRADES({"beta": 6.0}).adversarial(rec, [], x, y, train_attack)
    torch.manual_seed(11)
    start = x + 0.001 * torch.randn_like(x)
    assert torch.equal(rec.seen[0], x)  # the fixed target p_S(x)
    assert torch.equal(rec.seen[1], start)  # the first gradient is taken at the start
    _in_ball(x_adv, x)


def test_trades_with_no_attack_trains_on_clean_inputs():
    student, _, x, _, y = _nets(4)
    x_adv = TRADES({"beta": 6.0}).adversarial(student, [], x, y, TrainAttack("none", EPS))
    assert torch.equal(x_adv, x)


def _small_cnn():
    torch.manual_seed(0)
    m = build_model("small_cnn", in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,))
    m.train()
    with torch.no_grad():
        m(torch.rand(64, 1, 8, 8))  # non-trivial batch-norm statistics
    g = torch.Generator().manual_seed(1)
    return m, torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


def _steep_linear():
    g = torch.Generator().manual_seed(6)
    m = LinearLogits(3 * torch.randn(64, 4, generator=g))
    x = 0.2 + 0.6 * torch.rand(32, 1, 8, 8, generator=g)
    return m, x, torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("net", [_small_cnn, _steep_linear], ids=["small_cnn", "linear"])
@pytest.mark.parametrize(("name", "steps", "step"), [("fgsm", 1, 1.0), ("mifgsm", 10, 0.1)])
def test_trades_x_adv_is_an_ascent_not_sign_noise_of_a_round_off_gradient(name, steps, step, net):
    """Issue 17 bug 1. At x' = x the KL is flat: its gradient is round-off (orders of magnitude
    below the one at x + 0.001 * N(0, 1)), so an attack starting there steps along noise (or not
    at all). From TRADES's start the single-step and momentum attacks find an x' whose KL is
    well above that of random +-eps corners of the ball."""
    model, x, y = net()
    eps = 0.1
    method = TRADES({"beta": 6.0})
    objective = method.inner_objective(model, [], x, y)
    torch.manual_seed(2)
    with eval_mode(model):
        at_x = input_grad(model, x, objective).norm()
        at_start = input_grad(model, x + 0.001 * torch.randn_like(x), objective).norm()
    assert at_x < 1e-2 * at_start

    def kl(z):
        with torch.no_grad(), eval_mode(model):
            return objective(model(z)).item()

    corners = [kl((x + eps * torch.randn_like(x).sign()).clamp(0, 1)) for _ in range(16)]
    x_adv = method.adversarial(model, [], x, y, TrainAttack(name, eps, steps, step * eps))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert kl(x_adv) > 3 * max(corners)


# --- iad ---------------------------------------------------------------------------------------

IAD_HP = {"temperature": 2.0, "alpha": 0.7, "beta": 0.5, "warmup_frac": 0.3}


def _iad_hand(student, teacher, x, x_adv, y, hp, introspect=True, trust_input=None):
    """IAD-I from the authors' IAD-I.py, term by term."""
    t, a, b = hp["temperature"], hp["alpha"], hp["beta"]
    s_clean, s_adv = _rows(student, x), _rows(student, x_adv)
    t_clean = _rows(teacher, x)
    t_trust = _rows(teacher, x_adv if trust_input is None else trust_input)
    n = len(y)
    total = 0.0
    for i, k in enumerate(y.tolist()):
        distill = t * t * py_kl(py_softmax(t_clean[i], t), py_softmax(s_adv[i], t))
        total += a * distill + (1 - a) * _ce(s_clean[i], k)
        if introspect:
            gamma = py_softmax(t_trust[i])[k] ** b
            total += a * (1 - gamma) * py_kl(py_softmax(s_clean[i]), py_softmax(s_adv[i]))
    return total / n


def test_iad_loss_matches_hand_computation():
    student, teacher, x, x_adv, y = _nets()
    got = IAD(IAD_HP).loss(student, [teacher], x, x_adv, y).item()
    expected = _iad_hand(student, teacher, x, x_adv, y, IAD_HP)
    ard_only = _iad_hand(student, teacher, x, x_adv, y, IAD_HP, introspect=False)
    assert expected - ard_only > 0.01  # the introspection term is not vacuous here
    assert got == pytest.approx(expected, rel=1e-5)


def test_iad_trusts_the_teacher_by_its_confidence_on_x_adv():
    """gamma is p_T(y | x')^beta: the same formula with the teacher's confidence on x differs."""
    student, teacher, x, x_adv, y = _nets()
    ard = _iad_hand(student, teacher, x, x_adv, y, IAD_HP, introspect=False)
    got = IAD(IAD_HP).loss(student, [teacher], x, x_adv, y).item() - ard
    on_clean = _iad_hand(student, teacher, x, x_adv, y, IAD_HP, trust_input=x) - ard
    assert got == pytest.approx(_iad_hand(student, teacher, x, x_adv, y, IAD_HP) - ard, rel=1e-3)
    assert got != pytest.approx(on_clean, rel=1e-2)


def test_iad_warm_up_is_ard_then_introspection():
    student, teacher, x, x_adv, y = _nets()
    m = IAD(IAD_HP)  # warmup_frac 0.3 of 10 epochs: epochs 1-3 are ARD
    ard = _iad_hand(student, teacher, x, x_adv, y, IAD_HP, introspect=False)
    full = _iad_hand(student, teacher, x, x_adv, y, IAD_HP)
    for epoch, expected in [(1, ard), (3, ard), (4, full), (10, full)]:
        m.start_epoch(epoch, 10)
        assert m.loss(student, [teacher], x, x_adv, y).item() == pytest.approx(expected, rel=1e-5)
    # the paper's schedule: --begin 60 of 200 epochs (0-based) is warmup_frac 0.3
    m.start_epoch(60, 200)
    assert not m.introspect
    m.start_epoch(61, 200)
    assert m.introspect
    assert m.state_dict() == {}  # the phase follows the epoch: nothing to checkpoint


def test_iad_with_beta_zero_is_ard():
    """gamma = p^0 = 1 everywhere: the teacher is fully trusted."""
    student, teacher, x, x_adv, y = _nets()
    hp = {**IAD_HP, "beta": 0.0}
    got = IAD(hp).loss(student, [teacher], x, x_adv, y).item()
    ard = ARD({"temperature": 2.0, "alpha": 0.7}).loss(student, [teacher], x, x_adv, y).item()
    assert got == pytest.approx(ard, rel=1e-6)


def test_iad_gradient_goes_through_both_student_passes_and_not_through_gamma():
    student, teacher, x, x_adv, y = _nets()
    IAD(IAD_HP).loss(student, [teacher], x, x_adv, y).backward()
    assert teacher.w.grad is None
    got = student.w.grad.clone()
    w = student.w.detach().clone().requires_grad_(True)
    zc, za = x.flatten(1) @ w, x_adv.flatten(1) @ w
    with torch.no_grad():
        tc, ta = teacher(x), teacher(x_adv)
    gamma = ta.softmax(1)[torch.arange(len(y)), y] ** 0.5
    pt, ps = (tc / 2).softmax(1), (za / 2).softmax(1)
    distill = (pt * (pt.log() - ps.log())).sum(1).mean()
    pc = zc.softmax(1)
    intro = ((1 - gamma) * (pc * (pc.log() - za.softmax(1).log())).sum(1)).mean()
    (0.7 * 4 * distill + 0.7 * intro + 0.3 * F.cross_entropy(zc, y)).backward()
    assert torch.allclose(got, w.grad, rtol=1e-4, atol=1e-6)


def test_iad_inner_max_raises_the_student_ce():
    student, teacher, x, _, y = _nets(4)
    x_adv = IAD(IAD_HP).adversarial(student, [teacher], x, y, attack)

    def ce(xx):
        return F.cross_entropy(student(xx), y, reduction="sum").item()

    _check_ascent(ce, x, x_adv)
    assert student.w.grad is None and teacher.w.grad is None


# --- rslad -------------------------------------------------------------------------------------


def _rslad_hand(student, teacher, x, x_adv, w):
    s_clean, s_adv, t_clean = _rows(student, x), _rows(student, x_adv), _rows(teacher, x)
    adv = sum(py_kl(py_softmax(t), py_softmax(s)) for t, s in zip(t_clean, s_adv, strict=True))
    nat = sum(py_kl(py_softmax(t), py_softmax(s)) for t, s in zip(t_clean, s_clean, strict=True))
    return (w * adv + (1 - w) * nat) / len(t_clean)


@pytest.mark.parametrize("w", [5 / 6, 0.6])
def test_rslad_loss_matches_hand_computation(w):
    student, teacher, x, x_adv, y = _nets()
    got = RSLAD({"adv_weight": w}).loss(student, [teacher], x, x_adv, y).item()
    assert got == pytest.approx(_rslad_hand(student, teacher, x, x_adv, w), rel=1e-5)


def test_rslad_targets_are_the_teachers_clean_soft_labels():
    """KL(T(x) || S(.)): neither the reversed KL nor the teacher on x' gives the same value."""
    student, teacher, x, x_adv, y = _nets()
    w = 5 / 6
    got = RSLAD({"adv_weight": w}).loss(student, [teacher], x, x_adv, y).item()
    s_clean, s_adv, t_clean = _rows(student, x), _rows(student, x_adv), _rows(teacher, x)
    rev = sum(
        w * py_kl(py_softmax(s), py_softmax(t)) + (1 - w) * py_kl(py_softmax(c), py_softmax(t))
        for t, s, c in zip(t_clean, s_adv, s_clean, strict=True)
    ) / len(y)
    assert got != pytest.approx(rev, rel=1e-3)
    teacher_on_adv = _rslad_hand(student, teacher, x_adv, x_adv, w)
    assert got != pytest.approx(teacher_on_adv, rel=1e-3)


def test_rslad_inner_max_raises_kl_from_the_teacher_clean_soft_labels():
    student, teacher, x, _, y = _nets(5)
    x_adv = RSLAD({"adv_weight": 5 / 6}).adversarial(student, [teacher], x, y, attack)
    with torch.no_grad():
        p_t = teacher(x).softmax(1)

    def kl(xx):
        with torch.no_grad():
            q = student(xx).softmax(1)
        return (p_t * (p_t.log() - q.log())).sum().item()

    _check_ascent(kl, x, x_adv)
    assert student.w.grad is None and teacher.w.grad is None


class _Counting(LinearLogits):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_rslad_runs_the_teacher_once_per_step_and_never_reuses_another_batch():
    student, teacher, x, _, y = _nets()
    counting = _Counting(teacher.w.detach().clone()).eval()
    m = RSLAD({"adv_weight": 5 / 6})
    x_adv = m.adversarial(student, [counting], x, y, attack)
    loss = m.loss(student, [counting], x, x_adv, y)
    assert counting.calls == 1
    assert loss.item() == pytest.approx(_rslad_hand(student, teacher, x, x_adv, 5 / 6), rel=1e-5)
    # a new batch after an adversarial() on another one: its own teacher pass
    x2 = x.flip(0).clone()
    m.adversarial(student, [counting], x, y, attack)
    loss2 = m.loss(student, [counting], x2, x_adv, y)
    assert loss2.item() == pytest.approx(_rslad_hand(student, teacher, x2, x_adv, 5 / 6), rel=1e-5)


# --- all four ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PGDAT, TRADES, IAD, RSLAD])
def test_teachers_get_no_gradient_and_the_student_does(cls):
    student, teacher, x, x_adv, y = _nets()
    teachers = [teacher] if cls.teacher_set == "one" else []
    m = cls(PAPER_HP[cls])
    x_adv = m.adversarial(student, teachers, x, y, attack)
    m.loss(student, teachers, x, x_adv, y).backward()
    assert teacher.w.grad is None
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [PGDAT, TRADES, IAD, RSLAD])
def test_declarations_and_paper_settings_inside_the_space(cls):
    assert cls.needs_attack
    assert cls.teacher_set == ("one" if cls in (IAD, RSLAD) else "none")
    assert set(cls.space) == set(PAPER_HP[cls])
    for k, v in PAPER_HP[cls].items():
        assert cls.space[k].low <= v <= cls.space[k].high, k
    m = cls(PAPER_HP[cls])
    assert m.state_dict() == {}
    m.load_state_dict(m.state_dict())
    for k in cls.space:
        with pytest.raises(ValueError, match=k):
            cls({kk: v for kk, v in PAPER_HP[cls].items() if kk != k})
