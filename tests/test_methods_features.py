"""GACD (feature distillation, Bai et al. 2020) against hand computations, its inner maximisation,
and who gets gradients. (CAP's tests are in test_cap.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import py_softmax
from torch import nn

from sweep.attacks import pgd
from sweep.methods.gacd import GACD
from sweep.models import build_model


def attack(model, xx, obj):
    return pgd(model, xx, obj, eps=0.1, steps=5)


class FeatNet(nn.Module):
    """A hand-checkable network with a feature tap: features = tanh(x.flatten(1) @ W), logits =
    features @ V (the `features` / `head` convention of sweep.models)."""

    def __init__(self, w: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.head = nn.Linear(v.shape[0], v.shape[1], bias=False, dtype=v.dtype)
        self.head.weight.data = v.T.clone()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cos(a, b):
    dot = sum(u * v for u, v in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))


def _rows(t: torch.Tensor) -> list[list[float]]:
    return t.detach().double().tolist()


# --- GACD ---------------------------------------------------------------------------------------

GACD_HP = {"tau": 0.2, "distill_weight": 1.5}


def _gacd_setup(seed=0, n=6, d=4, ds=3, dt=5, c=3):
    g = torch.Generator().manual_seed(seed)
    dt_ = torch.float64
    student = FeatNet(torch.randn(d, ds, generator=g, dtype=dt_), torch.randn(ds, c, generator=g))
    student = student.double()
    # a wider teacher (dt != ds), logits spread so its confidence in the label varies a lot
    teacher = FeatNet(
        torch.randn(d, dt, generator=g, dtype=dt_), 3 * torch.randn(dt, c, generator=g)
    ).double()
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=dt_)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=g, dtype=dt_) - 1)).clamp(0, 1)
    y = torch.randint(0, c, (n,), generator=g)
    return student, teacher.eval(), x, x_adv, y


def _gacd_terms(student, teacher, x, x_adv, y, tau):
    """Per example: (CE of the student on x', InfoNCE l_i, teacher weight w_i), from the module
    docstring's formula with plain Python arithmetic."""
    fs = _rows(torch.tanh(x_adv.flatten(1) @ student.w))
    ft = _rows(torch.tanh(x.flatten(1) @ teacher.w))
    zs = _rows(torch.tanh(x_adv.flatten(1) @ student.w) @ student.head.weight.T)
    zt = _rows(torch.tanh(x.flatten(1) @ teacher.w) @ teacher.head.weight.T)
    n = len(fs)
    rs = [[_cos(fs[i], fs[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    rt = [[_cos(ft[i], ft[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    out = []
    for i, k in enumerate(y.tolist()):
        c = [_cos(rs[i], rt[j]) / tau for j in range(n)]
        l_i = -c[i] + math.log(sum(math.exp(v) for v in c))
        out.append((-math.log(py_softmax(zs[i])[k]), l_i, py_softmax(zt[i])[k]))
    return out


def _gacd_hand(student, teacher, x, x_adv, y, tau, lam):
    terms = _gacd_terms(student, teacher, x, x_adv, y, tau)
    n = len(terms)
    return sum(ce for ce, _, _ in terms) / n + lam * sum(w * nce for _, nce, w in terms) / n


def test_gacd_loss_matches_hand_computation():
    student, teacher, x, x_adv, y = _gacd_setup()
    got = GACD(GACD_HP).loss(student, [teacher], x, x_adv, y).item()
    expected = _gacd_hand(student, teacher, x, x_adv, y, 0.2, 1.5)
    ce_only = _gacd_hand(student, teacher, x, x_adv, y, 0.2, 0.0)
    assert abs(expected - ce_only) > 0.1  # the distillation term is not vacuous here
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("tau", "lam"), [(0.05, 10.0), (1.0, 0.1)])
def test_gacd_at_the_ends_of_its_range(tau, lam):
    student, teacher, x, x_adv, y = _gacd_setup(seed=3)
    got = GACD({"tau": tau, "distill_weight": lam}).loss(student, [teacher], x, x_adv, y).item()
    assert got == pytest.approx(_gacd_hand(student, teacher, x, x_adv, y, tau, lam), rel=1e-9)


def test_gacd_student_sees_x_adv_and_teacher_sees_x():
    student, teacher, x, x_adv, y = _gacd_setup(seed=1)
    got = GACD(GACD_HP).loss(student, [teacher], x, x_adv, y).item()
    swapped = _gacd_hand(student, teacher, x_adv, x, y, 0.2, 1.5)
    same = _gacd_hand(student, teacher, x_adv, x_adv, y, 0.2, 1.5)
    assert got != pytest.approx(swapped, rel=1e-4)
    assert got != pytest.approx(same, rel=1e-4)


def test_gacd_down_weights_examples_the_teacher_gets_wrong():
    """With a near one-hot teacher, examples it gets wrong drop out of the distillation term
    (w ~ 0) and the others count fully (w ~ 1)."""
    student, teacher, x, x_adv, _ = _gacd_setup(seed=2)
    with torch.no_grad():
        teacher.head.weight.mul_(200)
        pred = teacher(x).argmax(1)
    y = pred.clone()
    y[::2] = (pred[::2] + 1) % 3  # the teacher is wrong on every other example
    lam = 1.5
    got = GACD(GACD_HP).loss(student, [teacher], x, x_adv, y)
    ce = F.cross_entropy(student(x_adv), y)
    terms = _gacd_terms(student, teacher, x, x_adv, y, 0.2)
    assert [w > 0.99 for _, _, w in terms] == [i % 2 == 1 for i in range(len(y))]
    right_only = sum(nce for i, (_, nce, _) in enumerate(terms) if i % 2 == 1) / len(y)
    assert min(nce for _, nce, _ in terms[::2]) > 0.1  # the dropped ones are not vacuous
    assert ((got - ce) / lam).item() == pytest.approx(right_only, rel=1e-2)


def test_gacd_contrast_needs_no_projection_across_widths():
    """The relation space is N-dimensional whatever the features' width: a teacher whose
    features are duplicated (twice as wide, same geometry) gives exactly the same loss."""
    student, teacher, x, x_adv, y = _gacd_setup(seed=4)
    w, v = teacher.w.detach(), teacher.head.weight.detach().T
    wide = FeatNet(torch.cat([w, w], dim=1), torch.cat([v, torch.zeros_like(v)], dim=0)).eval()
    a = GACD(GACD_HP).loss(student, [teacher], x, x_adv, y).item()
    b = GACD(GACD_HP).loss(student, [wide], x, x_adv, y).item()
    assert a == pytest.approx(b, rel=1e-12)


def test_gacd_teacher_gets_no_gradient():
    student, teacher, x, x_adv, y = _gacd_setup()
    GACD(GACD_HP).loss(student, [teacher], x, x_adv, y).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0
    assert student.head.weight.grad.abs().sum() > 0


def test_gacd_inner_max_raises_student_ce_and_stays_in_ball():
    g = torch.Generator().manual_seed(5)
    student = FeatNet(3 * torch.randn(16, 8, generator=g), 3 * torch.randn(8, 4, generator=g))
    teacher = FeatNet(torch.randn(16, 6, generator=g), torch.randn(6, 4, generator=g)).eval()
    x = torch.rand(32, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    x_adv = GACD(GACD_HP).adversarial(student, [teacher], x, y, attack)
    noise = (x + 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        ce = [F.cross_entropy(student(z), y).item() for z in (x, noise, x_adv)]
    assert ce[2] > ce[0] + 0.2 and ce[2] > ce[1] + 0.2
    assert all(p.grad is None for p in teacher.parameters())


def test_gacd_runs_on_registered_architectures_of_different_widths():
    torch.manual_seed(0)
    kw = {"in_channels": 1, "num_classes": 10, "mean": (0.5,), "std": (0.25,)}
    student = build_model("small_cnn", **kw).train()  # 64 features
    teacher = build_model("resnet18", **kw).eval()  # 512 features
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    x_adv = GACD(GACD_HP).adversarial(student, [teacher], x, y, attack)
    loss = GACD(GACD_HP).loss(student, [teacher], x, x_adv, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_gacd_declares_itself_and_requires_its_hyperparameters():
    assert GACD.teacher_set == "one" and GACD.needs_attack and GACD.features == "penultimate"
    assert set(GACD.space) == {"tau", "distill_weight"}
    with pytest.raises(ValueError, match="distill_weight"):
        GACD({"tau": 0.1})
