"""`cap`: adversarial training by learning Confined Adversarial Polytopes (Hamidi & Ye 2024,
"Robustness Against Adversarial Attacks via Learning Confined Adversarial Polytopes",
arXiv:2401.07991; the group of the MSE / MCMI teacher-loss papers). No teacher.

The paper's idea: the *adversarial polytope* of x is the set of outputs S(x + delta) reachable
from the eps-ball. If every training example's polytope is small enough not to cross a decision
boundary, the network is robust. The paper estimates corner points of the polytope with several
particles and adds to cross-entropy a penalty, weighted by lambda, that pulls the corners'
outputs towards the polytope's centre.

THIS IS OUR READING, NOT A VERIFIED REPRODUCTION: we have not checked the paper's exact
particle algorithm, distance or centre against its text or code. We implement

    loss = CE(S(x), y) + beta * KL(S(x) || S(x')) + gamma * (1/K) sum_k KL(S(x) || S(x_k))

- the centre of the polytope is the output at the clean input, S(x);
- x' is the corner found by gradient ascent: it maximises KL(S(x) || S(x')) with S(x) fixed
  (the sweep's training attack on that objective, as TRADES does), so the beta term is TRADES's
  robust term and pulls the farthest corner found towards the centre;
- the K = `n_samples` points x_k = clip(x + r * u_k, 0, 1), u_k ~ U[-1, 1]^d, are undriven
  particles spread over the ball: the gamma term shrinks the polytope as a whole, not only at
  the one corner an attack found. r is the ball's L-inf radius per example, read off x' as
  max |x' - x| (the method is given the configured attack, not eps; for PGD and FGSM this is
  eps unless every coordinate of an example was clipped, and the points stay inside the ball
  whatever it is). The draws use torch's global generator: u = 2 * torch.rand(K, *x.shape) - 1.
As in TRADES, the gradient flows through S(x) in both KL terms. With FGSM as the training
attack (no random start) the KL objective has zero gradient at x and x' = x: use PGD.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..losses import soft_kl, trades_loss
from ..space import FloatParam
from .base import METHODS
from .trades import TRADES


def ball_samples(x: torch.Tensor, x_adv: torch.Tensor, n: int) -> torch.Tensor:
    """[n, *x.shape] uniform points in the L-inf ball of radius max|x' - x| (per example)
    around x, clipped to [0, 1]."""
    x, x_adv = x.detach(), x_adv.detach()
    radius = (x_adv - x).abs().flatten(1).amax(dim=1).view(1, -1, *[1] * (x.dim() - 1))
    u = 2 * torch.rand((n, *x.shape), device=x.device, dtype=x.dtype) - 1
    return (x.unsqueeze(0) + radius * u).clamp(0.0, 1.0)


@METHODS.register("cap")
class CAP(TRADES):
    """TRADES's inner maximisation and loss, plus the gamma term over random points."""

    summary = (
        "CAP (our reading): CE(S(x)) + beta*KL(S(x)||S(x')) + gamma*mean_k KL(S(x)||S(x_k)), "
        "x' maximising the KL, x_k uniform in the ball"
    )
    n_samples: ClassVar[int] = 2  # random particles per example (a constant, not searched)
    space = {"beta": FloatParam(low=1.0, high=10.0), "gamma": FloatParam(low=0.0, high=5.0)}

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        beta, gamma = self.hp["beta"], self.hp["gamma"]
        logits = student(x)
        loss = trades_loss(logits, student(x_adv), y, beta)
        if gamma > 0 and self.n_samples > 0:
            pts = ball_samples(x, x_adv, self.n_samples).flatten(0, 1)
            # batchmean over the n*N points = the mean over k of each point set's batchmean KL
            spread = soft_kl(student(pts), logits.repeat(self.n_samples, 1))
            loss = loss + gamma * spread
        return loss
