"""The training loop shared by teachers and students: optimiser, schedule, one epoch.

Why shared: a teacher is a student with a loss of (logits, labels); both need the same
augmentation, batching and non-finite-loss guard.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Splits, batches


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the trial fails with reason `diverged`."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params: Any, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """`optim` holds optimizer, lr, momentum, weight_decay (possibly tuned values)."""
    if optim["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=optim["lr"], weight_decay=optim["weight_decay"])
    return torch.optim.SGD(
        params,
        lr=optim["lr"],
        momentum=optim["momentum"],
        weight_decay=optim["weight_decay"],
        nesterov=optim["momentum"] > 0,
    )


def make_schedule(
    opt: torch.optim.Optimizer, kind: str, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, epochs * steps_per_epoch)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def make_optimization(
    model: nn.Module, optim: dict[str, Any], epochs: int, n_train: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Optimiser and per-step schedule over `epochs` passes of `n_train` examples."""
    opt = make_optimizer(model.parameters(), optim)
    steps = steps_per_epoch(n_train, optim["batch_size"])
    return opt, make_schedule(opt, optim["schedule"], epochs, steps)


def train_epoch(
    model: nn.Module,
    data: Splits,
    *,
    batch_size: int,
    augmentation: Callable[[torch.Tensor], torch.Tensor] | None,
    step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """One pass over the training split; returns the mean loss. `step_loss(x, y)` computes the
    loss of one (augmented) batch, adversarial examples included."""
    model.train()
    total, count = 0.0, 0
    for x, y in batches(data.x_train, data.y_train, batch_size, shuffle=True):
        if augmentation is not None:
            x = augmentation(x)
        loss = step_loss(x, y)
        if not torch.isfinite(loss):
            raise Diverged(f"training loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item() * len(y)
        count += len(y)
    return total / max(count, 1)
