"""Clean and robust accuracy. Robust accuracy counts every example: one misclassified when
clean counts as not robust (DESIGN §3.4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attacks import ce_objective, eval_mode, run_attack


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Any | None = None,
    eps: float = 0.0,
    batch_size: int = 256,
) -> float:
    """Accuracy on (x, y), on adversarial examples of `attack` (an AttackRun) when given."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if attack is not None:
                xb = run_attack(
                    attack.name,
                    model,
                    xb,
                    ce_objective(yb),
                    eps=eps,
                    steps=attack.steps,
                    step_size=attack.step_size,
                )
            correct += int(_correct(model, xb, yb).sum())
    return correct / max(len(x), 1)


def evaluate_suite(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[Any],
    *,
    eps: float,
    batch_size: int = 256,
    prefix: str = "test",
) -> dict[str, float]:
    """`{prefix}/clean_acc` and `{prefix}/robust_acc/<attack key>` for each attack."""
    out = {f"{prefix}/clean_acc": accuracy(model, x, y, batch_size=batch_size)}
    for a in attacks:
        out[f"{prefix}/robust_acc/{a.key}"] = accuracy(
            model, x, y, attack=a, eps=eps, batch_size=batch_size
        )
    return out
