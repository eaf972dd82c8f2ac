"""What every student objective declares, so the schema, the planner and `sweep list` can reason
about it without running it."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..attacks import Objective, ce_objective
from ..space import FloatParam, SearchParam


class Method:
    """A student objective. Subclasses set the class attributes and implement `loss`.

    Training step: x' = train_attack(student, x, inner_objective(...)) (x' = x for 'none'),
    then loss(student, teachers, x, x', y) is minimised.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    # "none", "one", "clean+robust" (MTARD) or "ensemble" (AT-AKA); see teacher_defs.py
    teacher_set: ClassVar[str] = "none"
    needs_attack: ClassVar[bool] = False  # its inner maximisation is part of the method
    inner_max: ClassVar[str] = "student cross-entropy"
    space: ClassVar[dict[str, SearchParam]] = {}

    def __init__(self, hp: dict[str, Any]) -> None:
        missing = [k for k in self.space if k not in hp]
        if missing:
            raise ValueError(f"method {self.name!r} needs hyperparameters {missing}")
        self.hp = hp

    def inner_objective(
        self, student: nn.Module, teachers: list[nn.Module], x: torch.Tensor, y: torch.Tensor
    ) -> Objective:
        return ce_objective(y)

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
            "space": {k: describe(v) for k, v in cls.space.items()},
        }


TEMPERATURE = FloatParam(low=1.0, high=10.0)
ALPHA = FloatParam(low=0.1, high=0.95)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Teachers are frozen and always in eval(): no batch-norm updates, no gradients."""
    return teacher(x)
