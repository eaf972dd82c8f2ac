"""`kd` (Hinton et al. 2015): alpha * T^2 * KL(p_T^tau || p_S^tau) + (1 - alpha) * CE(S, y),
teacher and student both on the training input x' (clean, or adversarial against the student's
cross-entropy when a train_attack is set)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import soft_kl
from .base import ALPHA, METHODS, TEMPERATURE, Method


@METHODS.register("kd")
class KD(Method):
    summary = "Hinton KD on x': alpha*T^2*KL(teacher||student) + (1-alpha)*CE"
    teacher_set = "one"
    space = {"temperature": TEMPERATURE, "alpha": ALPHA}

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t, a = self.hp["temperature"], self.hp["alpha"]
        s_logits = student(x_adv)
        t_logits = self.teacher_logits(teachers[0], x_adv)
        return a * t * t * soft_kl(s_logits, t_logits, t) + (1 - a) * F.cross_entropy(s_logits, y)
