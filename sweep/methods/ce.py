"""`ce`: cross-entropy on the training inputs, no teacher. With train_attack pgd this is PGD
adversarial training (Madry et al. 2018); with none, standard training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import METHODS, Method


@METHODS.register("ce")
class CE(Method):
    summary = "cross-entropy on x' (PGD-AT when train_attack is pgd); no teacher"

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        return F.cross_entropy(student(x_adv), y)
