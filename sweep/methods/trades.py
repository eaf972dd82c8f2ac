"""`trades` (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy"): CE(S(x), y) + beta * KL(p_S(x) || p_S(x')), batchmean, with
x' = argmax_{x' in B(x, eps)} KL(p_S(x) || p_S(x')), p_S(x) held fixed during the search.

Why: robust error splits into natural error plus boundary error; the CE term fights the first,
the KL term (a surrogate of the second) pushes the decision boundary away from the data without
asking x' to carry the label, and beta trades one for the other (the paper's CIFAR-10 setting
is beta = 1/lambda = 6, inside the default range).

As in the authors' code (github.com/yaodongyu/TRADES, trades.py at 9d308f1), the fixed target
p_S(x) of the inner search is computed with the student in eval() (the attack's mode), and the
outer KL keeps the gradient through p_S(x) (the clean distribution is not detached).

The search starts at x + 0.001 * N(0, 1), as the authors' code, whatever the cell's training
attack (`adversarial` passes it as the attack's `start`). Why it matters: the KL is exactly 0
with a zero gradient at x' = x, so an attack that starts at x (FGSM, MI-FGSM) would take its
first step along the sign of a round-off gradient, i.e. a random +-eps corner of the ball
(94% of the pixels moved by exactly eps on a small CNN), not an ascent direction. From the
tiny Gaussian offset the gradient is a real one. FGSM-RS's uniform start is replaced too, so
the fgsm_rs cell is one 1.25 * eps step from TRADES's start (a choice of ours: no reference
combines TRADES with FGSM-RS). The `none` cell ignores the start and trains on clean x.
"""

from __future__ import annotations

import torch

from ..attacks import AttackObjective, eval_mode, kl_objective
from ..fidelity import Fidelity
from ..losses import trades_loss
from ..space import FloatParam
from .base import LOSS_WEIGHT, METHODS, Attack, Method

# Standard deviation of the Gaussian offset the authors' inner search starts from.
START_STD = 0.001


def trades_start(x: torch.Tensor) -> torch.Tensor:
    """x + 0.001 * N(0, 1), not clipped to [0, 1]: the authors take the first gradient there
    unclipped; every attack projects its result onto the ball and [0, 1]."""
    return x.detach() + START_STD * torch.randn_like(x)


@METHODS.register("trades")
class TRADES(Method):
    summary = "TRADES (Zhang 2019): CE(S(x), y) + beta*KL(S(x)||S(x')), x' maximising that KL"
    teacher_set = "none"
    needs_attack = True
    inner_max = "KL(S(x) || S(x')) of the student, S(x) fixed, from x + 0.001*N(0, 1)"
    space = {"beta": FloatParam(low=1.0, high=10.0)}
    domain = {"beta": LOSS_WEIGHT}
    paper_default = {"beta": 6.0}
    fidelity = Fidelity(
        "authors-code",
        "Zhang et al., ICML 2019; github.com/yaodongyu/TRADES trades.py (commit 9d308f1)",
        (
            "the inner search is the cell's training attack: with pgd, 10 signed steps of eps/4 "
            "(2/255 at 8/255) by default where the authors use 0.007 at 0.031 (set "
            "train_attack.pgd.step_size: 0.007 to match)",
            "L2: the authors' search is SGD on the perturbation with lr 2*eps/steps on the "
            "normalised gradient (a random direction where it is zero); ours is L2 PGD with "
            "step eps/4 and no zero-gradient fallback",
            "with fgsm_rs the uniform start is replaced by x + 0.001*N(0, 1) (no reference)",
        ),
    )

    def inner_objective(self, student, teachers, x, y) -> AttackObjective:
        with torch.no_grad(), eval_mode(student):
            clean = student(x)
        return kl_objective(clean)

    def adversarial(self, student, teachers, x, y, attack: Attack) -> torch.Tensor:
        """The attack from x + 0.001 * N(0, 1), where the objective has a real gradient."""
        objective = self.inner_objective(student, teachers, x, y)
        return attack(student, x, objective, start=trades_start(x))

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        return trades_loss(student(x), student(x_adv), y, self.hp["beta"])
