"""What every student objective declares, so the schema, the planner and `sweep list` can reason
about it without running it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..attacks import Objective, ce_objective
from ..space import FloatParam, SearchParam

# The cell's training attack, configured (algorithm from the grid's train_attack axis, eps and
# steps from the file): attack(model, x, objective) -> x' maximising objective(model(x')) in the
# eps-ball. For train_attack 'none' it returns x unchanged.
Attack = Callable[[nn.Module, torch.Tensor, Objective], torch.Tensor]


class Method:
    """A student objective. Subclasses set the class attributes and implement `loss`.

    Training step: start_epoch(...) once per epoch; per batch
    x' = adversarial(student, teachers, x, y, attack) (by default: attack the student with
    inner_objective), then loss(student, teachers, x, x', y) is minimised. Methods with an
    inner maximisation of their own override `inner_objective` (or `adversarial`, when the
    attacked function is not the student alone, or x' is a list, one per teacher). State that
    evolves during training (adaptive weights) goes in state_dict(), which the trial checkpoints.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    # "none", "one", "clean+robust" (MTARD) or "ensemble" (AT-AKA); see teacher_defs.py
    teacher_set: ClassVar[str] = "none"
    needs_attack: ClassVar[bool] = False  # its inner maximisation is part of the method
    inner_max: ClassVar[str] = "student cross-entropy"
    # "penultimate" if loss() calls models.forward_features on the networks (GACD)
    features: ClassVar[str | None] = None
    space: ClassVar[dict[str, SearchParam]] = {}

    def __init__(self, hp: dict[str, Any]) -> None:
        missing = [k for k in self.space if k not in hp]
        if missing:
            raise ValueError(f"method {self.name!r} needs hyperparameters {missing}")
        self.hp = hp

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (1-based), for schedules such as warm-ups."""

    def inner_objective(
        self, student: nn.Module, teachers: list[nn.Module], x: torch.Tensor, y: torch.Tensor
    ) -> Objective:
        return ce_objective(y)

    def adversarial(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        attack: Attack,
    ) -> Any:
        return attack(student, x, self.inner_objective(student, teachers, x, y))

    def state_dict(self) -> dict[str, Any]:
        """Training state beyond the networks (tensors and numbers only: weights_only loads)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def loss(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        from ..space import describe

        return {
            "summary": cls.summary,
            "teachers": cls.teacher_set,
            "needs_attack": cls.needs_attack,
            "inner_max": cls.inner_max,
            "features": cls.features,
            "space": {k: describe(v) for k, v in cls.space.items()},
        }


TEMPERATURE = FloatParam(low=1.0, high=10.0)
ALPHA = FloatParam(low=0.1, high=0.95)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teachers are frozen and always in eval(): no batch-norm updates, no gradients."""
    return teacher(x)
