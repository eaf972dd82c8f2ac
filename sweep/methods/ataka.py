"""`ataka` (Hamidi & Ye 2024, "Adversarial Training via Adaptive Knowledge Amalgamation of an
Ensemble of Teachers", AT-AKA, arXiv 2405.13324).

An ensemble of K robust teachers, each fed its own adversarial example, and a student trained on
the teachers' logits amalgamated with adaptive weights. Why: adversarial examples from a single
attack generalise poorly to other attacks; diverse examples, judged by several teachers, give the
(small) student a broader picture of the ball than one teacher on one x' does.

What is implemented, per example i and teacher k (z_k = T_k(x'_k) logits, p_k = softmax(z_k)):

    x'_k  = argmax_{x' in B(x, eps)} CE(T_k(x'), y)       (the cell's training attack on T_k)
    a_k   = p_k(y | x'_k) / sum_j p_j(y | x'_j)            (softmax over k of log p_k(y))
    z_bar = sum_k a_k * z_k                                (amalgamated logits: the target)
    L     = (1/K) sum_k  T^2 * KL(softmax(z_bar / T) || softmax(S(x'_k) / T))

The student sees every teacher's example, and the teacher that still puts mass on the true class
at its own worst case is trusted most on that example. With K identical teachers on identical
inputs the weights are 1/K and the target is that teacher's distribution.

Where this departs from the paper, or guesses (we could read the abstract and summaries, not the
method section or code):
- The paper draws the K examples jointly with Stein variational gradient descent: a loss-ascent
  term plus a kernel repulsion between the particles that keeps them apart. Here each x'_k comes
  from the sweep's training attack (PGD/FGSM) on teacher k's cross-entropy; diversity comes from
  attacking K different networks (each from its own random start), not from a repulsion term.
  Which network's loss the paper's particles ascend (student or teachers) we could not confirm.
- The adaptive weights: the paper amalgamates logits adaptively; the rule (weights proportional
  to each teacher's confidence in the true label on its own example) is ours.
- No cross-entropy term and no clean term: the student learns from the amalgamated target only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import ce_objective
from ..losses import soft_kl
from ..space import FloatParam
from .base import METHODS, Method


def amalgamate(logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (K, N), amalgamated logits (N, C)) from K teachers' logits (each (N, C)).

    Weights: softmax over teachers of log p_k(y), i.e. proportional to each teacher's
    true-label probability, per example; computed in log space so no weight is ever NaN.
    """
    z = torch.stack(logits)  # (K, N, C)
    log_conf = F.log_softmax(z, dim=2).gather(2, y.view(1, -1, 1).expand(len(logits), -1, 1))
    weights = log_conf.squeeze(2).softmax(dim=0)  # (K, N)
    return weights, (weights.unsqueeze(2) * z).sum(dim=0)


@METHODS.register("ataka")
class ATAKA(Method):
    summary = "AT-AKA: one x' per teacher; T^2*KL(amalgamated teachers || S(x'_k)), mean over k"
    teacher_set = "ensemble"
    needs_attack = True
    inner_max = "each teacher's own cross-entropy: one x'_k per ensemble member"
    space = {"temperature": FloatParam(low=1.0, high=10.0)}

    def adversarial(self, student, teachers, x, y, attack) -> list[torch.Tensor]:
        return [attack(teacher, x, ce_objective(y)) for teacher in teachers]

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        if len(x_adv) != len(teachers):
            raise ValueError(f"ataka needs one x' per teacher: {len(x_adv)} for {len(teachers)}")
        t = self.hp["temperature"]
        logits = [self.teacher_logits(m, xk) for m, xk in zip(teachers, x_adv, strict=True)]
        _, target = amalgamate(logits, y)
        k = len(teachers)
        # one student pass over all K examples: batchmean over K*N is the mean over k of each
        # example set's batchmean KL
        s_logits = student(torch.cat(list(x_adv)))
        return t * t * soft_kl(s_logits, target.repeat(k, 1), t)
