"""`trades` (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy"): CE(S(x), y) + beta * KL(p_S(x) || p_S(x')), batchmean, with
x' = argmax_{x' in B(x, eps)} KL(p_S(x) || p_S(x')), p_S(x) held fixed during the search.

Why: robust error splits into natural error plus boundary error; the CE term fights the first,
the KL term (a surrogate of the second) pushes the decision boundary away from the data without
asking x' to carry the label, and beta trades one for the other (the paper's CIFAR-10 setting
is beta = 6, inside the default range).

As in the authors' code, the fixed target p_S(x) of the inner search is computed with the
student in eval() (the attack's mode), and the outer KL keeps the gradient through p_S(x) (the
clean distribution is not detached).

Deviation: the authors start the search at x + 0.001 * N(0, 1); here the attack algorithm comes
from the cell's train_attack axis, so PGD starts from a uniform point in the eps-ball. The KL is
exactly 0 with a zero gradient at x' = x, so an attack with no random start (plain FGSM) leaves
x' = x and the method reduces to clean training: use pgd, or an attack with a random start.
"""

from __future__ import annotations

import torch

from ..attacks import AttackObjective, eval_mode, kl_objective
from ..losses import trades_loss
from ..space import FloatParam
from .base import METHODS, Method


@METHODS.register("trades")
class TRADES(Method):
    summary = "TRADES (Zhang 2019): CE(S(x), y) + beta*KL(S(x)||S(x')), x' maximising that KL"
    teacher_set = "none"
    needs_attack = True
    inner_max = "KL(S(x) || S(x')) of the student, S(x) fixed"
    space = {"beta": FloatParam(low=1.0, high=10.0)}

    def inner_objective(self, student, teachers, x, y) -> AttackObjective:
        with torch.no_grad(), eval_mode(student):
            clean = student(x)
        return kl_objective(clean)

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        return trades_loss(student(x), student(x_adv), y, self.hp["beta"])
