"""GACD (feature distillation, Bai et al. 2020) on real architectures: its inner maximisation,
its build() on networks of different widths, and that the student and the heads learn together.
(The loss's formulas, memory and checkpointing are in test_gacd.py; CAP's tests in test_cap.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweep.attacks import pgd
from sweep.methods.gacd import GACD
from sweep.models import build_model


def attack(model, xx, obj):
    return pgd(model, xx, obj, eps=0.1, steps=5)


class FeatNet(nn.Module):
    """A network with a feature tap: features = tanh(x.flatten(1) @ W), logits = features @ V
    (the `features` / `head` convention of sweep.models)."""

    def __init__(self, w: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.head = nn.Linear(v.shape[0], v.shape[1], bias=False, dtype=v.dtype)
        self.head.weight.data = v.T.clone()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


GACD_HP = {"tau": 0.2, "distill_weight": 1.5}


def _archs(seed: int = 0):
    torch.manual_seed(seed)
    kw = {"in_channels": 1, "num_classes": 10, "mean": (0.5,), "std": (0.25,)}
    student = build_model("small_cnn", **kw).train()  # 64 features
    teacher = build_model("resnet18", **kw).eval().requires_grad_(False)  # 512 features
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 8, 8, generator=g)
    y = torch.arange(16) % 10
    return student, teacher, x, y


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
    student, teacher, x, y = _archs()
    method = GACD(GACD_HP)
    method.build(student, [teacher], x[:8], n_train=1000)
    x_adv = method.adversarial(student, [teacher], x, y, attack)
    loss = method.loss(student, [teacher], x, x_adv, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad.abs().sum() > 0 for p in method.trainable.parameters())


def _trained_losses(train_student: bool, steps: int = 30) -> list[float]:
    """Loss per SGD step on one fixed batch, the teacher confident (w ~ 1): the heads, and the
    student too if asked, in one optimiser (as the trial does)."""
    g = torch.Generator().manual_seed(0)
    student = FeatNet(torch.randn(16, 8, generator=g), torch.randn(8, 4, generator=g))
    teacher = FeatNet(torch.randn(16, 12, generator=g), 3 * torch.randn(12, 4, generator=g))
    teacher = teacher.eval().requires_grad_(False)
    x = torch.rand(32, 1, 4, 4, generator=g)
    y = teacher(x).argmax(1)
    torch.manual_seed(0)
    method = GACD({"tau": 0.1, "distill_weight": 1.0})
    method.build(student, [teacher], x, n_train=200)
    params = [*method.trainable.parameters()]
    params += [*student.parameters()] if train_student else []
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the negatives' draw
        loss = method.loss(student, [teacher], x, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("train_student", [True, False])
def test_gacd_heads_and_student_learn_the_contrastive_term(train_student):
    """Training lowers the loss, and the heads alone already do: they are learned, not fixed."""
    losses = _trained_losses(train_student)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("n_train", [5, 50_000])
def test_gacd_memory_size_follows_the_training_set(n_train):
    """About min(MEMORY_SIZE, M) slots in all, at least one per class."""
    student, teacher, x, _ = _archs()
    method = GACD(GACD_HP)
    method.build(student, [teacher], x, n_train=n_train)
    mem = method.trainable.memory
    assert mem.num_classes == 10
    assert mem.per_class == (1 if n_train == 5 else 3277)  # ceil(32768 / 10)
