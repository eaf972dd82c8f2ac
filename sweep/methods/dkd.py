"""`dkd` (Zhao et al., CVPR 2022, Decoupled Knowledge Distillation): CE(S(x'), y)
+ alpha * TCKD + beta * NCKD, teacher and student both on the training input x' (like `kd`).

With p = softmax(z / T) and t the label:
  TCKD = T^2 * KL(b_T || b_S), b = (p_t, 1 - p_t), the binary target / non-target split;
  NCKD = T^2 * KL(p^_T || p^_S), p^ = p over the non-target classes, renormalised.
Hinton KD is TCKD + (1 - p_t^teacher) * NCKD per example (the paper's eq. 2): the teacher's
confidence suppresses the non-target term, which DKD frees by weighting it with its own beta.

The paper ramps the KD terms in linearly over its first 20 of 240 epochs (a student that is
hit by beta = 8 from the first step can diverge); here over the same fraction of the run, in
`start_epoch`: factor min(epoch / warm, 1), warm = max(1, round(epochs * 20 / 240)). Without a
`start_epoch` call (unit tests) the factor is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fidelity import Fidelity
from ..losses import soft_kl
from ..space import FloatParam
from .base import LOSS_WEIGHT, METHODS, POSITIVE_TEMPERATURE, Method


def _split(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logit as an (N, 2) binary-logit pair, non-target logits as (N, C-1)).

    Why not the authors' `torch.log(softmax)` and `z - 1000 * mask`: dropping the target column
    is exact and needs no magic constant, and the binary pair (z_t, logsumexp(z_other)) has
    softmax (p_t, 1 - p_t) without ever taking log(0) when the student is very confident.
    """
    n, c = logits.shape
    target = logits.gather(1, y.view(n, 1))
    # the other classes in order: column j of row i is class j, or j + 1 from the label on.
    # A gather, not logits[~mask] (a boolean index: a host sync on a GPU to size its output)
    cols = torch.arange(c - 1, device=logits.device).expand(n, c - 1)
    others = logits.gather(1, cols + (cols >= y.view(n, 1)).long())
    binary = torch.cat([target, others.logsumexp(dim=1, keepdim=True)], dim=1)
    return binary, others


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) as batchmean KLs at `temperature`, without the T^2 factor (the caller's,
    as for `soft_kl`)."""
    s_bin, s_other = _split(student_logits / temperature, y)
    t_bin, t_other = _split(teacher_logits / temperature, y)
    return soft_kl(s_bin, t_bin), soft_kl(s_other, t_other)


WARMUP_FRACTION = 20 / 240  # the paper's warm-up: 20 of 240 epochs


@METHODS.register("dkd")
class DKD(Method):
    summary = "DKD on x': CE + alpha*T^2*KL(target/non-target) + beta*T^2*KL(non-target classes)"
    teacher_set = "one"
    # The paper's CIFAR-100 setting, alpha=1, beta=8, T=4, lies inside every range.
    space = {
        "temperature": FloatParam(low=1.0, high=8.0),
        "alpha": FloatParam(low=0.5, high=2.0),
        "beta": FloatParam(low=1.0, high=10.0),
    }
    domain = {"temperature": POSITIVE_TEMPERATURE, "alpha": LOSS_WEIGHT, "beta": LOSS_WEIGHT}
    # mdistiller engine/cfg.py: DKD.ALPHA 1.0, DKD.BETA 8.0, DKD.T 4.0 (CE weight 1.0)
    paper_default = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0}
    fidelity = Fidelity(
        "authors-code",
        "Zhao et al., CVPR 2022, Decoupled Knowledge Distillation; github.com/megvii-research/"
        "mdistiller distillers/DKD.py and engine/cfg.py (commit e8c5bb3)",
        (
            "The warm-up ramps the KD terms over the same fraction (20/240) of the run, not a "
            "fixed 20 epochs: the two agree only for a 240-epoch run.",
            "With a train_attack, teacher and student both see the adversarial x' (an "
            "extension: the paper distils on clean inputs).",
        ),
    )

    def __init__(self, hp) -> None:
        super().__init__(hp)
        self.warmup = 1.0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        warm = max(1, round(epochs * WARMUP_FRACTION))
        self.warmup = min(epoch / warm, 1.0)

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t, a, b = self.hp["temperature"], self.hp["alpha"], self.hp["beta"]
        a, b = a * self.warmup, b * self.warmup
        s_logits = student(x_adv)
        tckd, nckd = dkd_terms(s_logits, self.teacher_logits(teachers[0], x_adv), y, t)
        return F.cross_entropy(s_logits, y) + t * t * (a * tckd + b * nckd)
