"""`ce`: cross-entropy on the training inputs, no teacher. With train_attack pgd this is PGD
adversarial training (Madry et al. 2018); with none, standard training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fidelity import Fidelity
from .base import METHODS, Method


@METHODS.register("ce")
class CE(Method):
    summary = "cross-entropy on x' (PGD-AT when train_attack is pgd); no teacher"
    paper_default = {}  # no hyperparameters
    with_attack_is = "pgd_at"  # the same loss on the same x' (spec.same_cells)
    # a baseline of ours, not a paper's method: `pgd_at` is the one checked against Madry et al.
    fidelity = Fidelity(
        "ours",
        "kdsweep's teacher-free baseline: cross-entropy on the training input (standard "
        "training; with a PGD train_attack the objective of Madry et al., ICLR 2018, see pgd_at)",
    )

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        return F.cross_entropy(student(x_adv), y)
