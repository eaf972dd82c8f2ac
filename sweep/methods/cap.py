"""`cap`: adversarial training by learning Confined Adversarial Polytopes (Hamidi & Ye 2024,
"Robustness Against Adversarial Attacks via Learning Confined Adversarial Polytopes",
arXiv:2401.07991; the group of the MSE / MCMI teacher-loss papers). No teacher.

The paper's idea: the *adversarial polytope* of x is the set of outputs S(x + delta) reachable
from the eps-ball. If every training example's polytope is small enough not to cross a decision
boundary, the network is robust. What we could read of the paper (its abstract and third-party
summaries; not its method section, no code): N particles estimate corner points of each
sample's polytope, and the loss is cross-entropy plus lambda times the distance of the corner
outputs to the polytope's centre C_x. The distance, the centre, how the particles move, N and
lambda were NOT recovered.

OUR RECONSTRUCTION (not a verified reproduction), per example x with label y:

    p(.)   = softmax(S(.)),  c = p(x)                       centre: the clean output
    v_n    ~ N(0, I_C), centred (sum 0) and scaled to unit L2  one output direction per particle
    x_n    = argmax_{x_n in B(x, eps)} <p(x_n), v_n>        n = 1..N, from a uniform start
    loss   = CE(S(x), y) + lambda * (1/N) sum_n ||p(x_n) - c||_2^2

- Corners: the point of a (convex) polytope farthest along a direction v maximises <z, v>, and
  is a vertex; so each particle climbs its own output direction v_n and different particles
  reach different corners. Ascending the plain distance ||p - c|| instead would send every
  particle to the same farthest corner (TRADES's single x'). The directions are centred because
  probabilities sum to 1: only moves within the simplex exist. A direction in probability space
  ends at the class its largest component names, so the N particles act as N soft targeted
  attacks on different classes.
- The search is the training attack's mechanics: the student in eval() (batch-norm statistics
  untouched), signed steps for L-inf (L2-normalised for L2), projection onto the cell's training
  attack's eps-ball (its eps and norm) and [0, 1] after each step; the attack's `steps`, and its
  `step_size` (eps / 4 when unset). Directions and starts use torch's global generator.
- Distance: squared L2 of softmax probabilities (bounded by 2, so lambda has a fixed scale; a
  KL to a corner can be unbounded). The centre is S(x) under the training forward, and the
  gradient flows through both S(x) and S(x_n), as in TRADES's KL.
- One weight, `polytope_weight` (the paper's lambda; a distinct key, so a sweep file's global
  search_space entry for it applies to no other method). N = `n_particles` = 4, a constant.
- Cost: N x steps student gradients per batch (4x a PGD-AT step), plus one forward on N*B.
- Measured (digits, eps 0.1, 8 epochs, 5 particle steps of 0.05, 2 seeds, PGD-10 on 144
  validation examples): polytope_weight 6 gives 0.90 and 0.90 robust (clean 0.98), TRADES with
  beta 6 0.88 and 0.90 (clean 0.97): level, within the noise of 144 examples.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Ball, eval_mode, input_grad
from ..fidelity import Fidelity
from ..space import LogFloatParam
from .base import LOSS_WEIGHT, METHODS, Method


def output_directions(n: int, batch: int, classes: int, like: torch.Tensor) -> torch.Tensor:
    """[n, batch, classes] random unit directions in the probability simplex's tangent space
    (each sums to 0), one per particle and example."""
    v = torch.randn(n, batch, classes, device=like.device, dtype=like.dtype)
    v = v - v.mean(dim=2, keepdim=True)
    return v / v.norm(dim=2, keepdim=True).clamp_min(1e-12)


def corner_particles(
    model: nn.Module,
    x: torch.Tensor,
    directions: torch.Tensor,
    ball: Ball,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, *x.shape]: particle n of example i maximises <softmax(model(x_n,i)), v_n,i> over the
    ball (projected signed ascent from `starts`, uniform in the ball by default), the model in
    eval() as in an attack. Detached."""
    n = directions.shape[0]
    x = x.detach()
    p = ball.starts(x, n) if starts is None else starts.detach().clone()
    v = directions.detach().flatten(0, 1)

    def objective(logits: torch.Tensor) -> torch.Tensor:
        return (F.softmax(logits, dim=1) * v).sum()

    with eval_mode(model):
        for _ in range(ball.steps):
            grad = input_grad(model, p.flatten(0, 1), objective).reshape_as(p)
            p = ball.step(p, x, grad)
    return p.detach()


def polytope_spread(particle_logits: torch.Tensor, centre_logits: torch.Tensor) -> torch.Tensor:
    """Mean over particles and examples of ||softmax(particle) - softmax(centre)||_2^2.
    particle_logits: [N, B, C]; centre_logits: [B, C]."""
    diff = F.softmax(particle_logits, dim=2) - F.softmax(centre_logits, dim=1).unsqueeze(0)
    return diff.pow(2).sum(dim=2).mean()


def cap_loss(
    clean_logits: torch.Tensor, particle_logits: torch.Tensor, y: torch.Tensor, lam: float
) -> torch.Tensor:
    """CE(S(x), y) + lam * polytope_spread (see the module docstring)."""
    return F.cross_entropy(clean_logits, y) + lam * polytope_spread(particle_logits, clean_logits)


@METHODS.register("cap")
class CAP(Method):
    """Particles climb their own output direction to corners of the polytope; the loss pulls
    the corners' outputs towards the clean output."""

    summary = (
        "CAP (reconstruction): CE(S(x), y) + lambda * mean_n ||p(x_n) - p(x)||^2, x_n the N "
        "particles that climb random output directions to corners of the adversarial polytope"
    )
    teacher_set = "none"
    needs_attack = True
    inner_max = "N particles, each <softmax(S(x_n)), v_n> for its own random direction v_n"
    n_particles: ClassVar[int] = 4
    space = {"polytope_weight": LogFloatParam(low=0.5, high=50.0)}
    domain = {"polytope_weight": LOSS_WEIGHT}
    paper_default: ClassVar[dict[str, Any]] = {}  # lambda and N not recovered
    fidelity = Fidelity(
        "reconstruction",
        "Hamidi & Ye 2024, arXiv:2401.07991 (abstract and third-party summaries only; method "
        "section and code not read)",
        (
            "corner search is ours: each particle climbs a random centred direction of the "
            "softmax output with the training attack's signed projected steps",
            "the centre is the clean output p(x); the distance is squared L2 of probabilities",
            "N = 4 particles and the lambda range are ours; no paper default",
        ),
    )

    def adversarial(self, student, teachers, x, y, attack) -> list[torch.Tensor]:
        ball = Ball.of(attack, "cap")
        with torch.no_grad(), eval_mode(student):
            classes = student(x[:1]).shape[1]
        v = output_directions(self.n_particles, len(x), classes, x)
        return list(corner_particles(student, x, v, ball))

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        particles = torch.cat(list(x_adv))
        logits = student(x)
        p_logits = student(particles).view(len(x_adv), len(x), -1)
        return cap_loss(logits, p_logits, y, self.hp["polytope_weight"])
