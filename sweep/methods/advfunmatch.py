"""`advfunmatch` (Wu, Gao, Zhou & Wang 2023, "AdvFunMatch: When Consistent Teaching Meets
Adversarial Robustness", arXiv 2305.14700).

Function matching (Beyer et al. 2022, "consistent teaching") feeds teacher and student the same
input and treats KD as matching the two functions. AdvFunMatch asks the functions to agree on the
whole eps-ball around each training point, a min-max problem:

    min_S  E_x  max_{x' in B(x, eps)}  T^2 * KL(p_T(x')^T || p_S(x')^T)

The inner max finds the "mismatched examples", the points where student and teacher disagree
most; the outer min matches the student to the teacher *there* (both networks see x'). Why it
transfers robustness: a student that agrees with a robust teacher everywhere in the ball inherits
its behaviour under attack, without any label or cross-entropy term.

Choices (the paper has no code we could read):
- One loss term, no clean matching term and no CE: the paper's objective is the min-max KL alone.
- The inner max uses the same temperature T as the outer min, so both players optimise one
  function (the paper writes the plain KL; with T = 1 the two coincide).
- Batchmean KL with T^2 (DESIGN §3.5). The paper's strong augmentation (AutoAugment) is the
  sweep's data augmentation, not part of the method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackObjective
from ..fidelity import Fidelity
from ..losses import soft_kl
from ..space import FloatParam
from .base import METHODS, POSITIVE_TEMPERATURE, Method


class StudentTeacher(nn.Module):
    """Both networks on one input, stacked as (2, N, C): [student logits, teacher logits].

    What the attack differentiates, so x' can maximise a function of student *and* teacher.
    The attack takes gradients w.r.t. the input only (torch.autograd.grad), so neither network's
    parameters get a .grad; `eval_mode` on this wrapper puts both in eval() and restores them.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack((self.student(x), self.teacher(x)))


def mismatch_objective(temperature: float) -> AttackObjective:
    """KL(p_T^T || p_S^T) on stacked (student, teacher) logits, summed over the batch (a sum, like
    `ce_objective`, so the per-example gradient does not shrink with the batch size)."""

    def objective(both: torch.Tensor) -> torch.Tensor:
        s, t = both[0] / temperature, both[1] / temperature
        return F.kl_div(
            F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="sum", log_target=True
        )

    return objective


@METHODS.register("advfunmatch")
class AdvFunMatch(Method):
    summary = "AdvFunMatch: x' maximises KL(T(x')||S(x')); loss T^2*KL(T(x')||S(x'))"
    teacher_set = "one"
    needs_attack = True
    inner_max = "KL(teacher(x') || student(x')), both networks on x' (mismatched examples)"
    space = {"temperature": FloatParam(low=1.0, high=8.0)}
    domain = {"temperature": POSITIVE_TEMPERATURE}
    paper_default = {"temperature": 1.0}  # the paper's objective is the plain KL
    fidelity = Fidelity(
        "paper-text",
        "Wu, Gao, Zhou & Wang 2023, AdvFunMatch: When Consistent Teaching Meets Adversarial "
        "Robustness (arXiv 2305.14700); no code read",
        (
            "The temperature is ours: the paper's objective is the plain KL (T = 1, the "
            "paper_default); at T > 1 the inner max and the loss both use the softened KL times "
            "T^2.",
            "The strong augmentation the paper finds helpful (AutoAugment, per image) is not part "
            "of the method: it applies only when the sweep's dataset asks for it.",
        ),
    )

    def adversarial(self, student, teachers, x, y, attack) -> torch.Tensor:
        both = StudentTeacher(student, teachers[0])
        return attack(both, x, mismatch_objective(self.hp["temperature"]))

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t = self.hp["temperature"]
        return t * t * soft_kl(student(x_adv), self.teacher_logits(teachers[0], x_adv), t)
