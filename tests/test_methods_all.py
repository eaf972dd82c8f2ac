"""Properties every registered method must have, checked on the registry itself so a new method
cannot skip them: its training example stays in the eps-ball and the data range, its declared
inner maximisation increases, its default space covers what its loss reads, and its loss is a
finite scalar with no gradient reaching a teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import LinearLogits
from torch import nn

from sweep.methods import METHODS
from sweep.methods.base import Method
from sweep.space import is_searched
from sweep.training import TrainAttack

EPS = 0.1
N_TEACHERS = {"none": 0, "one": 1, "clean+robust": 2, "ensemble": 3}


class _Tapped(LinearLogits):
    """LinearLogits with the feature tap of models.forward_features: features, then a head."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__(w)
        self.head = nn.Linear(w.shape[1], 4, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _setup(cls: type[Method], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _Tapped if cls.features else LinearLogits
    width = 5 if cls.features else 4
    student = net(torch.randn(12, width, generator=g))
    teachers = [
        net(torch.randn(12, width, generator=g)).requires_grad_(False).eval()
        for _ in range(N_TEACHERS[cls.teacher_set])
    ]
    x = torch.rand(6, 3, 2, 2, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    hp = {
        k: (v.low + v.high) / 2 if is_searched(v) and hasattr(v, "low") else v
        for k, v in cls.space.items()
    }
    method = cls(hp)
    method.build(student, teachers, x, n_train=len(x))  # a no-op unless it owns parts (gacd)
    return method, student, teachers, x, y


# the cell's training attack as a trial gives it (methods with a search of their own read its
# eps, steps and step size): PGD-10 with Madry's step
_attack = TrainAttack("pgd", EPS, steps=10, step_size=2.5 * EPS / 10)


@pytest.mark.parametrize("name", METHODS.names())
def test_training_examples_stay_in_the_ball_and_data_range(name):
    method, student, teachers, x, y = _setup(METHODS.get(name))
    torch.manual_seed(0)
    x_adv = method.adversarial(student, teachers, x, y, _attack)
    for xa in x_adv if isinstance(x_adv, list) else [x_adv]:
        assert xa.shape == x.shape
        assert (xa - x).abs().max() <= EPS + 1e-6
        assert xa.min() >= 0 and xa.max() <= 1


@pytest.mark.parametrize(
    "name", [n for n in METHODS.names() if "adversarial" not in vars(METHODS.get(n))]
)
def test_inner_maximisation_increases_its_objective(name):
    """Methods that attack the student with `inner_objective` (the others test their own)."""
    method, student, teachers, x, y = _setup(METHODS.get(name))
    objective = method.inner_objective(student, teachers, x, y)
    torch.manual_seed(0)
    x_adv = method.adversarial(student, teachers, x, y, _attack)
    with torch.no_grad():
        assert objective(student(x_adv)) > objective(student(x)) + 1e-4, name


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_is_finite_and_reaches_the_student_only(name):
    method, student, teachers, x, y = _setup(METHODS.get(name))
    method.start_epoch(1, 10)
    torch.manual_seed(0)
    x_adv = method.adversarial(student, teachers, x, y, _attack)
    loss = method.loss(student, teachers, x, x_adv, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert student.w.grad is not None and student.w.grad.abs().sum() > 0
    assert all(t.w.grad is None for t in teachers)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_describes_itself_for_sweep_list(name):
    info = METHODS.get(name).describe()
    assert info["teachers"] in N_TEACHERS and info["inner_max"] and info["summary"]
    assert isinstance(info["space"], dict)
