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
