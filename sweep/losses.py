"""Loss terms shared by teacher losses and student methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(
    student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_target^T || p_student^T) with `batchmean` reduction (the true KL per example).

    `reduction="mean"` would also divide by the number of classes, a bug common in public KD
    code. The T^2 factor of Hinton et al. is the caller's: methods apply it where the paper does.
    """
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(target_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def trades_loss(
    clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float
) -> torch.Tensor:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x')), batchmean, with the
    gradient through both p(x) and p(x') as in the authors' code. Shared by the `trades` teacher
    loss and the `trades` student method."""
    return F.cross_entropy(clean_logits, y) + beta * soft_kl(adv_logits, clean_logits)
