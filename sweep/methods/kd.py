"""`kd` (Hinton et al. 2015): alpha * T^2 * KL(p_T^tau || p_S^tau) + (1 - alpha) * CE(S, y),
teacher and student both on the training input x' (clean, or adversarial against the student's
cross-entropy when a train_attack is set).

The paper gives the form (a weighted average of the soft-target and hard-label objectives, the
soft one multiplied by T^2) but no single setting for CIFAR, and no code. `paper_default` is
therefore the KD baseline of the DKD authors' mdistiller (megvii-research/mdistiller,
engine/cfg.py: T = 4, CE weight 0.1, KD weight 0.9, i.e. alpha = 0.9), whose KD loss is this one
(a per-example KL summed over classes, averaged over the batch, times T^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fidelity import Fidelity
from ..losses import soft_kl
from .base import ALPHA, CONVEX_WEIGHT, METHODS, POSITIVE_TEMPERATURE, TEMPERATURE, Method


@METHODS.register("kd")
class KD(Method):
    summary = "Hinton KD on x': alpha*T^2*KL(teacher||student) + (1-alpha)*CE"
    teacher_set = "one"
    space = {"temperature": TEMPERATURE, "alpha": ALPHA}
    domain = {"temperature": POSITIVE_TEMPERATURE, "alpha": CONVEX_WEIGHT}
    paper_default = {"temperature": 4.0, "alpha": 0.9}  # mdistiller's KD setting (see above)
    fidelity = Fidelity(
        "paper-text",
        "Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network (arXiv "
        "1503.02531; no released code); compared with mdistiller's KD (megvii-research/"
        "mdistiller distillers/KD.py), whose CIFAR-100 setting is paper_default",
        (
            "With a train_attack, teacher and student both see the adversarial x' (an "
            "extension: Hinton's KD trains on clean inputs).",
        ),
    )

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t, a = self.hp["temperature"], self.hp["alpha"]
        s_logits = student(x_adv)
        t_logits = self.teacher_logits(teachers[0], x_adv)
        return a * t * t * soft_kl(s_logits, t_logits, t) + (1 - a) * F.cross_entropy(s_logits, y)
