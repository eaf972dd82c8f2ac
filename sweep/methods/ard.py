"""`ard` (Goldblum et al. 2019, Adversarially Robust Distillation): x' maximises the student's
cross-entropy; loss alpha * T^2 * KL(T(x)/T || S(x')/T) + (1 - alpha) * CE(S(x), y).
The teacher sees the clean input, the student the adversarial one; the CE term is on clean x."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import soft_kl
from .base import ALPHA, METHODS, TEMPERATURE, Method


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
    space = {"temperature": TEMPERATURE, "alpha": ALPHA}

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t_clean = self.teacher_logits(teachers[0], x)
        hp = self.hp
        return ard_loss(student(x_adv), t_clean, student(x), y, hp["temperature"], hp["alpha"])
