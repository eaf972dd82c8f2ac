"""`ard` (Goldblum, Fowl, Feizi & Goldstein, AAAI 2020, arXiv 2019, "Adversarially Robust
Distillation"):
x' maximises the student's cross-entropy; loss

    alpha * T^2 * KL(T(x)/T || S(x')/T) + (1 - alpha) * CE(S(x), y)

The teacher sees the clean input, the student the adversarial one; the CE term is on clean x.

The published setting (the authors' main.py defaults, used for CIFAR-10) is T = 30, alpha = 1.0:
no CE term at all, the student only matches the teacher's very soft clean labels on x'. ARD
therefore has its own ranges, T in log[1, 30] and alpha in [0.1, 1.0], not the shared
TEMPERATURE / ALPHA of base.py (T <= 10, alpha <= 0.95), so that `paper_default` can be run and
the search can find it. At alpha = 1 the CE term's weight is exactly 0 (a valid loss; S(x) is
still computed, its gradient is zero). T is searched on a log scale: 1..5 gets as many trials as
5..30.

Reduction, and what their alpha is in ours. The authors' `nn.KLDivLoss()` uses the default
`mean` reduction, which averages over the batch *and the C classes*, so their KL term is
KL_batchmean / C. Ours is batchmean (DESIGN §3.5, losses.soft_kl). Their loss is therefore

    L_theirs = alpha * T^2 * KL / C + (1 - alpha) * CE = s * L_ours(alpha')
    alpha'   = alpha / (alpha + C * (1 - alpha)),    s = alpha / C + (1 - alpha)

i.e. their alpha balances the two terms like our alpha' (C = 10: their 0.5 is our 0.091, their
0.9 is our 0.474), and the whole loss is s times ours. At their alpha = 1, alpha' = 1 too and the
only difference is the scale s = 1/C: our loss is C times theirs, which under SGD with weight
decay equals theirs with the learning rate times C and the weight decay divided by C.

Attack mode: the authors run the PGD attack through the student in train mode (batch norm on
batch statistics, running averages updated by each attack step); ours attacks in eval mode
(attacks.eval_mode), as every method here does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fidelity import Fidelity
from ..losses import soft_kl
from ..space import FloatParam, LogFloatParam
from .base import CONVEX_WEIGHT, METHODS, POSITIVE_TEMPERATURE, Method

FIDELITY = Fidelity(
    "authors-code",
    "Goldblum et al., AAAI 2020 (arXiv 1905.09747), Adversarially Robust Distillation; "
    "github.com/goldblum/AdversariallyRobustDistillation main.py (commit 8860f70)",
    (
        "Their nn.KLDivLoss() mean reduction also divides the KL by the number of classes C (ours "
        "is batchmean): their alpha weighs KL against CE as our alpha/(alpha + C(1 - alpha)) "
        "does, and at their alpha = 1 our loss is C times theirs.",
        "Their training attack runs the student in train mode (batch statistics); ours in eval "
        "mode.",
    ),
)


def ard_loss(
    s_adv: torch.Tensor,
    t_clean: torch.Tensor,
    s_clean: torch.Tensor,
    y: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(T(x)/T || S(x')/T) + (1 - alpha) * CE(S(x), y), from the logits (IAD
    builds on it)."""
    kl = soft_kl(s_adv, t_clean, temperature)
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s_clean, y)


@METHODS.register("ard")
class ARD(Method):
    summary = "ARD: alpha*T^2*KL(T(x)||S(x')) + (1-alpha)*CE(S(x), y)"
    teacher_set = "one"
    needs_attack = True
    # wider than base.TEMPERATURE / ALPHA so the published T = 30, alpha = 1.0 lies inside
    space = {
        "temperature": LogFloatParam(low=1.0, high=30.0),
        "alpha": FloatParam(low=0.1, high=1.0),
    }
    domain = {"temperature": POSITIVE_TEMPERATURE, "alpha": CONVEX_WEIGHT}
    paper_default = {"temperature": 30.0, "alpha": 1.0}
    fidelity = FIDELITY

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t_clean = self.teacher_logits(teachers[0], x)
        hp = self.hp
        return ard_loss(student(x_adv), t_clean, student(x), y, hp["temperature"], hp["alpha"])
