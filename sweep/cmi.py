"""Conditional mutual information (CMI), separation and normalised CMI of a classifier's outputs.

Why: the `mcmi` and `cmic` teacher losses shape these quantities, and a teacher's CMI is a
predictor of how well it distils (Ye et al., ICLR 2024); measuring them on the trained teacher
tells whether the loss did what it claims.

Definitions (Yang et al., "Conditional Mutual Information Constrained Deep Learning for
Classification"; Ye et al., ICLR 2024, "Bayes Conditional Distribution Estimation for Knowledge
Distillation"):

- P_x: the softmax output (a probability vector over the C classes) of input x.
- Q_y: the class-conditional mean of P_x over the inputs of class y, the class "centroid".
- CMI = E_y E_{x|y} KL(P_x || Q_y): how far outputs scatter around their class centroid.
  Empirically the mean over samples i of KL(P_i || Q_{y_i}), which weights each class by its
  frequency (= sum_y pi_y E_{x|y}).
- Separation Gamma = E[1{Y != V} H(P_X, P_U)] over two independent labelled samples (X, Y),
  (U, V), with the cross-entropy H(p, q) = -sum_k p_k log q_k: how far apart the outputs of
  different classes are. Empirically (1/n^2) sum_{i, j: y_i != y_j} H(P_i, P_j); the 1/n^2
  (not 1/#pairs) is the expectation's, so the 1{Y != V} factor counts against same-class pairs.
- NCMI = CMI / Gamma: small when classes are tight (low CMI) and far apart (high Gamma).

Logs are floored at LOG_FLOOR so an output that underflows to 0 gives a large finite number
instead of NaN (0 * log 0 is then 0, as it should be).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import eval_mode

# the one floor for the logs of probabilities, here and in the mcmi/cmic teacher losses
LOG_FLOOR = 1e-12


def floored_log(p: torch.Tensor) -> torch.Tensor:
    """log of probabilities floored at LOG_FLOOR (see the module docstring)."""
    return p.clamp_min(LOG_FLOOR).log()


def class_centroids(probs: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[num_classes, C]: row c is the mean of the rows of `probs` with label c.

    A class absent from `y` gets the uniform distribution: it is the least informative guess
    and keeps every row a probability vector (a zero row would make KL(P || Q) infinite).
    """
    c = probs.shape[1]
    sums = probs.new_zeros(num_classes, c).index_add_(0, y, probs)
    counts = torch.bincount(y, minlength=num_classes).to(probs.dtype)
    uniform = torch.full_like(sums, 1.0 / c)
    present = (counts > 0).unsqueeze(1)
    return torch.where(present, sums / counts.clamp_min(1).unsqueeze(1), uniform)


@torch.no_grad()
def full_pass_centroids(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch_size: int,
    *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Class means of `model`'s softmax outputs over one pass of (x, y), as the MCMI authors set
    their centroids before fine-tuning: shuffled batches of `batch_size`, each augmented as in
    training, the model in **train** mode (their code calls model.train(); batch-norm then
    normalises with batch statistics and updates its running ones, as it did for them). No
    gradient. Each submodule's mode is restored afterwards.

    Shuffled (the global torch RNG) because in train mode a batch's composition changes its
    outputs, and their loader shuffles."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        order = torch.randperm(len(x), device=x.device)
        probs, labels = [], []
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx] if augment is None else augment(x[idx])
            probs.append(F.softmax(model(xb).float(), dim=1))
            labels.append(y[idx])
    finally:
        for m, mode in modes:
            m.train(mode)
    p = torch.cat(probs)
    return class_centroids(p, torch.cat(labels).to(p.device), num_classes)


def cmi(
    probs: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over samples of KL(P_i || Q_{y_i}); `centroids` default to those of `probs` itself."""
    if centroids is None:
        centroids = class_centroids(probs, y, probs.shape[1])
    q = centroids[y]
    return (probs * (floored_log(probs) - floored_log(q))).sum(dim=1).mean()


def separation(probs: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(1/n^2) sum over pairs with different labels of H(P_i, P_j), `chunk` rows at a time.

    A chunk's cross-entropies against all n outputs are one matrix product, P_chunk @ (-log P)^T,
    so memory is chunk x n rather than the n x n x C of the naive broadcast (10 000^2 x 100
    floats would be 40 GB). Accumulated in float64: n^2 = 10^8 terms.
    """
    n = probs.shape[0]
    neg_log = -floored_log(probs)
    total = probs.new_zeros((), dtype=torch.float64)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        h = probs[rows] @ neg_log.T  # h[a, j] = H(P_{start+a}, P_j)
        other = y[rows].unsqueeze(1) != y.unsqueeze(0)
        total = total + torch.where(other, h, torch.zeros_like(h)).sum(dtype=torch.float64)
    return (total / (n * n)).to(probs.dtype)


def ncmi(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CMI / separation, both on the same outputs."""
    return cmi(probs, y) / separation(probs, y)


def output_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """CMI, separation and NCMI of `model`'s softmax outputs on (x, y), in eval mode.

    Eval mode so batch-norm uses its running statistics (the outputs the teacher will give a
    student); each submodule's own mode is restored afterwards.
    """
    with eval_mode(model), torch.no_grad():
        probs = torch.cat(
            [F.softmax(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
        )
    y = y.to(probs.device)
    c, s = cmi(probs, y), separation(probs, y)
    return {"cmi": c.item(), "separation": s.item(), "ncmi": (c / s).item()}
