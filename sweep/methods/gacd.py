"""`gacd` (Bai et al. 2020, "Feature Distillation With Guided Adversarial Contrastive Learning",
arXiv:2009.09922): robustness is distilled through penultimate *features*, with a contrastive
(InfoNCE) objective that pairs the student's features on x' with the teacher's features on the
clean x, each example re-weighted by how much the teacher can be trusted on it.

    loss = CE(S(x'), y) + lambda * (1/N) sum_i w_i * l_i
    l_i  = -log( exp(c_ii / tau) / sum_j exp(c_ij / tau) ),   c_ij = cos(r^S_i, r^T_j)
    w_i  = p_T(y_i | x_i)              (the teacher's probability of the true label, no gradient)
    r^S_i = row i of the student's N x N cosine-similarity matrix of f_S(x'_1..x'_N),
    r^T_j = row j of the teacher's N x N cosine-similarity matrix of f_T(x_1..x_N),
    both with the diagonal (self-similarity, always 1) set to 0.

x' maximises the student's cross-entropy (the configured training attack, as in ARD).

What we chose, and why (deviations from the paper):
- The paper, after CRD (Tian et al. 2020), embeds both networks' features with learned linear
  heads into one space before the contrastive critic. A trial's optimiser only sees the
  student's parameters and a method has no trainable state, so we use a parameter-free shared
  space instead: each example is represented by its *relations* to the other examples of the
  batch (its row of cosine similarities), an N-vector whatever the network's width. The
  positive pair for example i is (student relations of x'_i, teacher relations of x_i); the
  negatives are the teacher's relations of the other examples of the batch. This keeps the
  paper's two ingredients - a contrastive bound on the features' mutual information and the
  teacher's *structural* knowledge - but it is not the paper's exact estimator (no memory bank
  of negatives, no learned projection). The diagonal is zeroed so that a positive pair does not
  match for free on the self-similarity entry both rows share.
- Sample re-weighting: the paper discounts examples the teacher gets wrong; we use the soft
  version, the teacher's probability of the true label on x, and average w_i * l_i over the
  batch (so a batch the teacher is unsure of weighs less in total).
- The paper's inner maximisation may differ (its "guided" adversarial examples); here x'
  maximises the student's CE, the ARD choice, with the sweep's training attack.
Keys are `tau` and `distill_weight` rather than `temperature`/`alpha`: a sweep-wide
`search_space.temperature` (KD's T in [1, 10]) must not land on a contrastive tau.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import forward_features
from ..space import FloatParam, LogFloatParam
from .base import METHODS, Method


def _relations(features: torch.Tensor) -> torch.Tensor:
    """N x N cosine similarities within the batch, the diagonal set to 0."""
    z = F.normalize(features.flatten(1), dim=1)
    sim = z @ z.T
    return sim * (1 - torch.eye(len(z), device=z.device, dtype=z.dtype))


def relation_infonce(
    student_features: torch.Tensor, teacher_features: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-example InfoNCE loss [N] between the two networks' relation rows (see the module
    docstring); the widths of the two feature tensors may differ."""
    rs = F.normalize(_relations(student_features), dim=1)
    rt = F.normalize(_relations(teacher_features), dim=1)
    logits = rs @ rt.T / tau
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


@METHODS.register("gacd")
class GACD(Method):
    summary = (
        "GACD: CE(S(x')) + lambda * teacher-confidence-weighted InfoNCE between the batch "
        "relations of student features on x' and teacher features on x"
    )
    teacher_set = "one"
    needs_attack = True
    inner_max = "student cross-entropy"
    features = "penultimate"
    space = {
        "tau": LogFloatParam(low=0.05, high=1.0),
        "distill_weight": FloatParam(low=0.1, high=10.0),
    }

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        tau, lam = self.hp["tau"], self.hp["distill_weight"]
        s_feat, s_logits = forward_features(student, x_adv)
        t_feat, t_logits = self.teacher_features(teachers[0], x)  # no_grad
        w = F.softmax(t_logits, dim=1).gather(1, y[:, None]).squeeze(1)
        contrast = (w * relation_infonce(s_feat, t_feat, tau)).mean()
        return F.cross_entropy(s_logits, y) + lam * contrast
