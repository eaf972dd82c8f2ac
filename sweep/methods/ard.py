"""`ard` (Goldblum et al. 2019, Adversarially Robust Distillation): x' maximises the student's
cross-entropy; loss alpha * T^2 * KL(T(x)/T || S(x')/T) + (1 - alpha) * CE(S(x), y).
The teacher sees the clean input, the student the adversarial one; the CE term is on clean x."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import soft_kl
from .base import ALPHA, TEMPERATURE, Method, teacher_logits


class ARD(Method):
    name = "ard"
    summary = "ARD: alpha*T^2*KL(T(x)||S(x')) + (1-alpha)*CE(S(x), y)"
    teacher_set = "one"
    needs_attack = True
    space = {"temperature": TEMPERATURE, "alpha": ALPHA}

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t, a = self.hp["temperature"], self.hp["alpha"]
        kl = soft_kl(student(x_adv), teacher_logits(teachers[0], x), t)
        return a * t * t * kl + (1 - a) * F.cross_entropy(student(x), y)
