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


# On an accelerator, how many steps may run between two reads of the divergence flag: each read
# waits for the device to finish its queue, so reading it every step would stall the pipeline.
CHECK_EVERY = 50


def train_epoch(
    model: nn.Module,
    data: Splits,
    *,
    batch_size: int,
    augmentation: Callable[[torch.Tensor], torch.Tensor] | None,
    step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    check_every: int | None = None,
) -> float:
    """One pass over the training split; returns the mean loss. `step_loss(x, y)` computes the
    loss of one (augmented) batch, adversarial examples included.

    No host sync per step: the loss sum (float64, as the Python float sum it replaces, so the
    value is the same) and a "some loss was not finite" flag stay on the device, and the host
    reads them once at the end of the epoch. The divergence guard reads the flag every
    `check_every` steps (default: every step on a CPU, where reading costs nothing, and every
    CHECK_EVERY steps on an accelerator), so a diverged trial still raises Diverged, at most
    `check_every - 1` wasted steps later; its weights are then garbage, but a trial that raises
    never checkpoints them.
    """
    model.train()
    device = data.x_train.device
    if check_every is None:
        check_every = 1 if device.type == "cpu" else CHECK_EVERY
    total = torch.zeros((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    count, step = 0, 0
    for step, (x, y) in enumerate(batches(data.x_train, data.y_train, batch_size, shuffle=True), 1):
        if augmentation is not None:
            x = augmentation(x)
        loss = step_loss(x, y)
        value = loss.detach()
        finite &= torch.isfinite(value)
        if step % check_every == 0:
            _check_finite(finite, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += value.double() * len(y)
        count += len(y)
    _check_finite(finite, step)
    return total.item() / max(count, 1)


def _check_finite(finite: torch.Tensor, step: int) -> None:
    """Raise Diverged if a loss so far was not finite (one host sync)."""
    if not bool(finite):
        raise Diverged(f"training loss became NaN or infinite at or before step {step}")
