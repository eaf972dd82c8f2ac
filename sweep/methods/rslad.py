"""`rslad` (Zi et al., ICCV 2021, "Revisiting Adversarial Robustness Distillation: Robust Soft
Labels Make Student Better"):

  x'   = argmax_{x' in B(x, eps)} KL(T(x) || S(x'))
  loss = w_adv * KL(T(x) || S(x')) + (1 - w_adv) * KL(T(x) || S(x))      (batchmean, T = 1)

with w_adv = 5/6 in the paper. Why: the robust teacher's soft labels on *clean* inputs (robust
soft labels) replace the hard label everywhere: in the inner maximisation (no CE) and in both
outer terms, so the student never fits a one-hot target it cannot reach on x'.

Direction of the KL: the paper writes KL(S(x'), T(x)) in PyTorch's argument order; the authors'
code computes kl_div(log_softmax(S(x')), softmax(T(x))), i.e. KL(T(x) || S(x')) with the
teacher's clean distribution as the target, in the inner maximisation and in both outer terms.
That is what is implemented. Temperature 1 and no T^2, as in the paper.

Searchable: `adv_weight` = w_adv only, the natural weight being 1 - w_adv, so the two weights
keep summing to 1 as in the paper (5/6 lies inside the default range).

Deviations from the authors' code, and why:
- Their outer KLs are `torch.mean` over batch *and classes* (their README notes this and
  multiplies CIFAR-100's loss by 10 to compensate), with log(p + 1e-5); here the KL is batchmean
  (DESIGN §3.5), so the loss is C times theirs (10 on CIFAR-10). Under SGD with weight decay
  that is theirs with the learning rate times C and the weight decay divided by C; the sweep's
  learning rate absorbs the first, not the second.
- Their inner search starts at x + 0.001 * N(0, 1); here the attack comes from the cell's
  train_attack axis (PGD starts uniformly in the eps-ball). Unlike TRADES's, the objective is not
  flat at x' = x (S(x) differs from T(x)), so FGSM from x also moves.
"""

from __future__ import annotations

import torch

from ..attacks import AttackObjective, kl_objective
from ..fidelity import Fidelity
from ..losses import soft_kl
from ..space import FloatParam
from .base import CONVEX_WEIGHT, METHODS, Method


@METHODS.register("rslad")
class RSLAD(Method):
    summary = "RSLAD (Zi 2021): w*KL(T(x)||S(x')) + (1-w)*KL(T(x)||S(x)), x' maximising the first"
    teacher_set = "one"
    needs_attack = True
    inner_max = "KL(T(x) || S(x')), the teacher's clean soft labels as target"
    space = {"adv_weight": FloatParam(low=0.5, high=0.95)}
    domain = {"adv_weight": CONVEX_WEIGHT}
    paper_default = {"adv_weight": 5 / 6}
    fidelity = Fidelity(
        "authors-code",
        "Zi et al., ICCV 2021, Revisiting Adversarial Robustness Distillation: Robust Soft Labels "
        "Make Student Better; github.com/zibojia/RSLAD (rslad_loss.py, resnet18_rslad_cifar10.py)",
        (
            "Their outer KLs average over the classes as well as the batch; ours is batchmean, so "
            "our loss is C times theirs (learning rate times C, weight decay divided by C).",
            "Their KL takes log(p + 1e-5) of the probabilities; ours is exact (log_softmax).",
            "Their inner maximisation starts at x + 0.001 N(0, 1); ours starts as the cell's "
            "train_attack does (PGD: uniform in the eps-ball).",
        ),
    )

    def inner_objective(self, student, teachers, x, y) -> AttackObjective:
        # T(x) is computed here once for the batch; loss() gets the same tensor back
        return kl_objective(self.teacher_logits(teachers[0], x))

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        w = self.hp["adv_weight"]
        t_clean = self.teacher_logits(teachers[0], x)
        return w * soft_kl(student(x_adv), t_clean) + (1 - w) * soft_kl(student(x), t_clean)
