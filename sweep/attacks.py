"""L-inf attacks in plain PyTorch, behind one registry.

The mechanics follow DESIGN.md §3.4: the attacked model is put in eval() (batch-norm statistics
untouched) and restored afterwards; gradients are taken with torch.autograd.grad with respect to
the input only, so no parameter's .grad is touched; every iterate is projected onto the eps-ball
and clipped to the data range [0, 1].

An attack maximises an *objective*: a function of the model's logits on the perturbed input that
returns a scalar. The plain attack uses cross-entropy against the label; distillation methods
pass their own inner-maximisation objective (e.g. a KL against the teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack: its function and whether it iterates (takes `steps`)."""

    fn: Callable[..., torch.Tensor]
    iterative: bool
    summary: str


ATTACKS: Registry[AttackInfo] = Registry("attack")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate in eval() and restore each submodule's own mode afterwards."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def ce_objective(y: torch.Tensor) -> Objective:
    """Sum (not mean) so a per-example gradient does not shrink with the batch size."""
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


def input_grad(model: nn.Module, x: torch.Tensor, objective: Objective) -> torch.Tensor:
    """d objective(model(x)) / dx, taken w.r.t. the input only (no parameter's .grad is touched).

    The caller chooses the model's mode; the attacks below call it inside `eval_mode`.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = objective(model(x))
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L-inf eps-ball around x, then into the data range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


# the private names predate the public ones; kept so nothing that used them breaks
_input_grad = input_grad
_project = project


def no_attack(model: nn.Module, x: torch.Tensor, objective: Objective, **_: object) -> torch.Tensor:
    return x


def fgsm(
    model: nn.Module, x: torch.Tensor, objective: Objective, *, eps: float, **_: object
) -> torch.Tensor:
    """Goodfellow et al. 2015: one signed-gradient step of size eps from the clean input."""
    with eval_mode(model):
        grad = input_grad(model, x, objective)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    **_: object,
) -> torch.Tensor:
    """Madry et al. 2018: projected signed-gradient ascent from a uniform random start.

    The default step size 2.5 * eps / steps is Madry et al.'s rule: enough to reach the ball's
    boundary from anywhere inside it.
    """
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = project(x_adv + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    with eval_mode(model):
        for _ in range(steps):
            grad = input_grad(model, x_adv, objective)
            x_adv = project(x_adv + alpha * grad.sign(), x, eps)
    return x_adv.detach()


ATTACKS.register("none")(AttackInfo(no_attack, False, "clean inputs"))
ATTACKS.register("fgsm")(AttackInfo(fgsm, False, "FGSM, one step of size eps"))
ATTACKS.register("pgd")(AttackInfo(pgd, True, "PGD L-inf with random start"))


def run_attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    objective: Objective,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
) -> torch.Tensor:
    return ATTACKS.get(name).fn(model, x, objective, eps=eps, steps=steps, step_size=step_size)
