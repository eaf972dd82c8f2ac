"""The training loop shared by teachers and students: optimiser, schedule, one epoch, and the
student's training step.

Why shared: a teacher is a student with a loss of (logits, labels); both need the same
augmentation, batching and non-finite-loss guard. The student's step (`student_epoch`,
`student_step_loss`) lives here, not in the trial, so that the trial and every benchmark run the
same code: a benchmark that copied the step would time something the trial does not run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from .attacks import run_attack
from .data import Splits, batches
from .fast import FastPath, to_format, training_forwards
from .space import StrictModel

StepLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> loss of one batch


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the trial fails with reason `diverged`."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class OptimSpec(StrictModel):
    """The optimiser settings of the sweep file (`student.optim`, `teacher.optim`, a fine-tune's
    `optim`): what `make_optimizer` and `make_schedule` take, here beside them."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = Field(False, description="plain momentum, as the references train")
    weight_decay: float = Field(
        2e-4, ge=0, description="2e-4 as TRADES, ARD, RSLAD and MTARD train on CIFAR-10"
    )
    batch_size: int = Field(128, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"


def make_optimizer(params: Any, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """`optim` holds optimizer, lr, momentum, weight_decay (possibly tuned values) and nesterov
    (default off: TRADES, ARD, RSLAD, MTARD and MCMI train with plain SGD momentum)."""
    if optim["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=optim["lr"], weight_decay=optim["weight_decay"])
    return torch.optim.SGD(
        params,
        lr=optim["lr"],
        momentum=optim["momentum"],
        weight_decay=optim["weight_decay"],
        nesterov=bool(optim.get("nesterov")) and optim["momentum"] > 0,
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
    step_loss: StepLoss,
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


def fast_epoch(
    model: nn.Module,
    data: Splits,
    *,
    fast: FastPath,
    others: Sequence[nn.Module] = (),
    batch_size: int,
    augmentation: Callable[[torch.Tensor], torch.Tensor] | None,
    step_loss: StepLoss,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    check_every: int | None = None,
) -> float:
    """`train_epoch` on the fast path: the forwards of `model` and of the frozen `others` (the
    teachers) run under `training_forwards(fast, ...)` for the epoch, and only then (evaluation
    after the epoch stays fp32). `step_loss` puts its batch in the models' memory format itself
    (`to_format`). Compilation (`fast.maybe_compile`) is the caller's: once per model, after any
    state is loaded."""
    with training_forwards(fast, model, *others):
        return train_epoch(
            model,
            data,
            batch_size=batch_size,
            augmentation=augmentation,
            step_loss=step_loss,
            optimizer=optimizer,
            schedule=schedule,
            check_every=check_every,
        )


@dataclass(frozen=True)
class TrainAttack:
    """The cell's training attack, configured: `attack(model, x, objective, start=None)` -> x'
    maximising objective(model(x')) within the eps-ball (`attacks.run_attack`); what
    `Method.adversarial` is given. `name` is the grid's train_attack (`none` returns x
    unchanged). `start`: where the attack starts instead of its own starting point (TRADES's
    x + 0.001 * N(0, 1)). `params`: the attack's own parameters (MI-FGSM's decay) as sorted
    (name, value) pairs, passed to it as keywords.

    Built by `sweep.attack_defs.TrainAttackSpec.resolve`, which fills every field (step_size
    included) from the attack's training protocol. Plain fields and the dataclass repr, since
    it is logged; `log_params()` is its flat form for a run's params.
    """

    name: str
    eps: float
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    params: tuple[tuple[str, float], ...] = ()

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        objective: Callable[[torch.Tensor], torch.Tensor],
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return run_attack(
            self.name,
            model,
            x,
            objective,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            norm=self.norm,
            start=start,
            **dict(self.params),
        )

    def log_params(self) -> dict[str, Any]:
        """The attack as flat run params: train_attack_eps, _steps, _step_size, _norm and one
        train_attack_<param> per parameter."""
        out: dict[str, Any] = {
            "train_attack_eps": self.eps,
            "train_attack_steps": self.steps,
            "train_attack_step_size": self.step_size,
            "train_attack_norm": self.norm,
        }
        out.update({f"train_attack_{k}": v for k, v in self.params})
        return out


def student_step_loss(
    method: Any,
    student: nn.Module,
    teachers: Sequence[nn.Module],
    attack: TrainAttack,
    fast: FastPath,
) -> StepLoss:
    """The loss of one student training step on an (augmented) batch: x in the models' memory
    format, x' = method.adversarial(...) with the training attack, then method.loss(...).
    `method` is a `methods.Method`. Run it inside `fast_epoch` (which `student_epoch` does):
    the per-model bf16 forwards are switched on there, not here."""
    teachers = list(teachers)

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = to_format(x, fast)
        x_adv = method.adversarial(student, teachers, x, y, attack)
        return method.loss(student, teachers, x, x_adv, y)

    return step_loss


def student_epoch(
    method: Any,
    student: nn.Module,
    teachers: Sequence[nn.Module],
    data: Splits,
    *,
    attack: TrainAttack,
    fast: FastPath,
    batch_size: int,
    augmentation: Callable[[torch.Tensor], torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    check_every: int | None = None,
) -> float:
    """One training epoch of a student, as a trial runs it and the benchmarks time it: the
    step loss of `student_step_loss` through `fast_epoch` (the teachers' and the student's
    forwards on the fast path). Returns the epoch's mean loss; raises Diverged. The trial calls
    `method.start_epoch` before it and `fast.prepare` / `fast.maybe_compile` on the student
    when building it."""
    return fast_epoch(
        student,
        data,
        fast=fast,
        others=teachers,
        batch_size=batch_size,
        augmentation=augmentation,
        step_loss=student_step_loss(method, student, teachers, attack, fast),
        optimizer=optimizer,
        schedule=schedule,
        check_every=check_every,
    )
