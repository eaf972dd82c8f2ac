"""`pgd_at` (Madry et al., ICLR 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks"): min_theta E max_{x' in B(x, eps)} CE(S(x'), y).

The inner maximisation attacks the student's own cross-entropy; the outer step minimises the same
cross-entropy at x' only (no clean term). The attack algorithm is the cell's train_attack axis
(Madry et al. used PGD with a uniform random start, which is `pgd` here).

Why a method of its own when `ce` with train_attack pgd computes the same loss: `pgd_at` declares
needs_attack, so the planner refuses it without an attack instead of silently running standard
training, and tables read "PGD-AT" as a robust baseline beside `trades`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fidelity import Fidelity
from .base import METHODS, Method


@METHODS.register("pgd_at")
class PGDAT(Method):
    summary = "PGD-AT (Madry 2018): CE(S(x'), y), x' maximising the student's CE"
    teacher_set = "none"
    needs_attack = True
    inner_max = "student cross-entropy"
    space = {}
    paper_default = {}  # no hyperparameters (eps, steps, step size are the train_attack's)
    fidelity = Fidelity(
        "authors-code",
        "Madry et al., ICLR 2018, Towards Deep Learning Models Resistant to Adversarial Attacks; "
        "github.com/MadryLab/cifar10_challenge train.py and model.py (commit 2fbf5bb)",
        (
            "Their attack runs the network built in training mode (batch norm on batch "
            "statistics, its running averages updated by every attack step); ours attacks the "
            "student in eval mode.",
        ),
    )

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        return F.cross_entropy(student(x_adv), y)
