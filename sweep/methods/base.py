"""What every student objective declares, so the schema, the planner and `sweep list` can reason
about it without running it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..attacks import AttackObjective, ce_objective
from ..fidelity import UNDECLARED, Fidelity
from ..models import forward_features
from ..registry import Registry
from ..space import Domain, FloatParam, SearchParam


class Attack(Protocol):
    """The cell's training attack, configured (algorithm from the grid's train_attack axis, its
    settings from the file's train_attack block; a training.TrainAttack): attack(model, x,
    objective, start=None) -> x' maximising objective(model(x')) in the eps-ball, from `start`
    when given (TRADES's x + 0.001 * N(0, 1)). For train_attack 'none' it returns x unchanged."""

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        objective: AttackObjective,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class Method:
    """A student objective. Subclasses set the class attributes, implement `loss`, and are
    registered with `@METHODS.register("<name>")`, which sets `name`.

    Training step: start_epoch(...) once per epoch; per batch
    x' = adversarial(student, teachers, x, y, attack) (by default: attack the student with
    inner_objective), then loss(student, teachers, x, x', y) is minimised. Methods with an
    inner maximisation of their own override `inner_objective` (or `adversarial`, when the
    attacked function is not the student alone, or x' is a list, one per teacher). State that
    evolves during training (adaptive weights) goes in state_dict(), which the trial checkpoints.

    Teachers are run through `self.teacher_logits(teacher, x)` (or `self.teacher_features`):
    frozen, no gradient, and computed once per (teacher, input tensor) for the batch, however
    many terms of adversarial() and loss() ask for them (see TeacherOutputs).
    """

    name: ClassVar[str]  # the registry key, set by @METHODS.register
    summary: ClassVar[str]
    # "none", "one", "clean+robust" (MTARD) or "ensemble" (AT-AKA); see teacher_defs.py
    teacher_set: ClassVar[str] = "none"
    needs_attack: ClassVar[bool] = False  # its inner maximisation is part of the method
    inner_max: ClassVar[str] = "student cross-entropy"
    # "penultimate" if loss() calls models.forward_features on the networks (GACD)
    features: ClassVar[str | None] = None
    space: ClassVar[dict[str, SearchParam]] = {}
    # Where each hyperparameter of `space` makes sense at all (every key of `space` has one):
    # the sweep file's ranges and fixed values are checked against it (spec.py).
    domain: ClassVar[dict[str, Domain]] = {}
    # The paper's own setting of the searched hyperparameters (keys of `space`): each cell's
    # first trial runs it before tuning starts, and `sweep list` shows it beside the ranges.
    paper_default: ClassVar[dict[str, Any]] = {}
    # How this implementation was checked against its paper (fidelity.py).
    fidelity: ClassVar[Fidelity] = UNDECLARED
    # The method this one computes exactly once it has a training attack (`ce` is `pgd_at`):
    # a grid holding both runs such a cell once, as that method (spec.same_cells).
    with_attack_is: ClassVar[str | None] = None

    def __init__(self, hp: dict[str, Any]) -> None:
        missing = [k for k in self.space if k not in hp]
        if missing:
            raise ValueError(f"method {self.name!r} needs hyperparameters {missing}")
        self.hp = hp
        self._teacher_outputs = TeacherOutputs()
        # trainable parts the method owns (projection heads, critics, memory banks), made by
        # build(): the trial's optimiser trains them with the student and its checkpoint holds them
        self.trainable: nn.Module | None = None

    def build(
        self, student: nn.Module, teachers: list[nn.Module], x: torch.Tensor, n_train: int
    ) -> None:
        """Called once per trial after the networks exist and before the optimiser is made, with
        a sample batch `x` (to read feature sizes off) and the training-set size. A method that
        owns trainable parts sets `self.trainable` (an nn.Module) here, on x's device; the default owns none."""

    def teacher_logits(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """teacher(x) under no_grad, shared by every term of this batch that needs it."""
        return self._outputs().get(teacher, x, features=False)[1]

    def teacher_features(
        self, teacher: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, logits) of teacher on x (models.forward_features), no_grad,
        shared like teacher_logits (whose later calls on x reuse these logits)."""
        feats, logits = self._outputs().get(teacher, x, features=True)
        assert feats is not None
        return feats, logits

    def _outputs(self) -> TeacherOutputs:
        if getattr(self, "_teacher_outputs", None) is None:  # a subclass skipped __init__
            self._teacher_outputs = TeacherOutputs()
        return self._teacher_outputs

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (1-based), for schedules such as warm-ups."""

    def inner_objective(
        self, student: nn.Module, teachers: list[nn.Module], x: torch.Tensor, y: torch.Tensor
    ) -> AttackObjective:
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
            "paper_default": dict(cls.paper_default),
            "fidelity": cls.fidelity.describe(),
        }


METHODS: Registry[type[Method]] = Registry("method")

TEMPERATURE = FloatParam(low=1.0, high=10.0)
ALPHA = FloatParam(low=0.1, high=0.95)
# Domains shared by several methods (Method.domain)
POSITIVE_TEMPERATURE = Domain(low=0.0, low_open=True, doc="a softmax temperature")
CONVEX_WEIGHT = Domain(low=0.0, high=1.0, doc="the weight of a convex mix of two losses")
LOSS_WEIGHT = Domain(low=0.0, doc="a loss term's weight")


# each teacher's parameters and buffers, collected once: walking the module tree costs ~0.5 ms
# for a WRN-34-10, reading the 193 version counters of the list ~20 us
_STATE: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, ...]] = weakref.WeakKeyDictionary()


def _state_version(module: nn.Module) -> int:
    """Sum of the version counters of the module's parameters and buffers: it changes whenever
    one of them is modified in place (an optimiser step, load_state_dict, copy_ under no_grad)."""
    tensors = _STATE.get(module)
    if tensors is None:
        tensors = _STATE[module] = tuple(chain(module.parameters(), module.buffers()))
    return sum(t._version for t in tensors)


@dataclass
class _Entry:
    x: weakref.ref
    x_version: int
    teacher: weakref.ref
    teacher_version: int
    logits: torch.Tensor
    features: torch.Tensor | None


class TeacherOutputs:
    """Teacher outputs on the inputs of the batch in flight: one forward per (teacher, input).

    Why: the same T(x) is wanted by a method's inner maximisation and by its loss (RSLAD), by two
    terms of one loss, or as logits after a features pass (GACD-like terms); on a GPU a
    WRN-34-10 teacher's forward costs as much as the student's step. A method just asks for
    T(x) wherever it needs it, and this makes the second ask free, so adding a method stays one
    module with no plumbing of precomputed outputs.

    Entries are keyed by the identity of the teacher and of the input tensor, and hold the input
    by weak reference: an entry is dropped as soon as its input tensor is freed (the trial's
    batch, once the step is done), so there is no scope to open or close and a new batch never
    meets an old one's outputs. An entry whose input or teacher was modified in place since
    (version counters) is recomputed, not reused.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def get(
        self, teacher: nn.Module, x: torch.Tensor, *, features: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        key = (id(teacher), id(x))
        version = _state_version(teacher)
        e = self._entries.get(key)
        if e is not None and not (
            e.x() is x
            and e.teacher() is teacher
            and e.x_version == x._version
            and e.teacher_version == version
        ):
            e = None
        if e is not None and (e.features is not None or not features):
            return e.features, e.logits
        if features:
            feats, logits = forward_features(teacher, x)
        else:
            feats, logits = None, teacher(x)
        entries = self._entries
        self._entries[key] = _Entry(
            weakref.ref(x, lambda _, k=key: entries.pop(k, None)),
            x._version,
            weakref.ref(teacher),
            version,
            logits,
            feats,
        )
        return feats, logits
