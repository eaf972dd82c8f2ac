"""Which teachers a sweep trains: the grid's teacher entries, teacher sets, and their resolution
into concrete `TeacherDef`s.

Why a module of its own: a teacher is defined by content (loss, its parameters, architecture,
epochs, seed), not by the cell that asked for it. Everything that can vary a teacher is resolved
here, at load time, so the cache hash, the cell keys and the MLflow runs all agree, and a bad
parameter is rejected before any trial starts.

In the sweep file:

    grid:
      teacher_loss:
        - ce
        - {name: mcmi, params: {lambda: [0.05, 0.1]}}   # a list: one teacher per value
        - {name: trades, params: {beta: 6}, label: trades6}
    teacher_sets:            # how methods with more than one teacher get the others
      robust: {loss: trades}                    # clean + robust (MTARD): the cell's + this one;
                                                # required by such methods, no default
      ensemble: {size: 3}                       # K copies of the cell's teacher, seeds s..s+K-1
      # ensemble: {members: [{}, {arch: resnet18}, {loss: mse, seed: 7}]}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from .models import MODELS
from .space import StrictModel
from .teacher_losses import TEACHER_LOSSES

Scalar = float | int | None
# What a method says about its teachers (Method.teacher_set).
TEACHER_SET_KINDS = ("none", "one", "clean+robust", "ensemble")


def _known_loss(name: str) -> str:
    if name not in TEACHER_LOSSES:
        raise ValueError(f"unknown teacher loss {name!r}; allowed: {', '.join(TEACHER_LOSSES)}")
    return name


def check_params(loss: str, params: dict[str, Any], *, lists: bool = False) -> None:
    """Parameter names and values against the loss's declaration; errors name the parameter."""
    declared = TEACHER_LOSSES.get(loss).params
    for key, value in params.items():
        if key not in declared:
            allowed = ", ".join(sorted(declared)) or "none"
            raise ValueError(f"params.{key}: not a parameter of {loss!r}; allowed: {allowed}")
        values = value if lists and isinstance(value, list) else [value]
        if lists and isinstance(value, list):
            if not value:
                raise ValueError(f"params.{key}: an empty list trains no teacher")
            if len(set(map(str, value))) != len(value):
                raise ValueError(f"params.{key}: lists a value twice: {value}")
        for v in values:
            problem = declared[key].check(v)
            if problem:
                raise ValueError(f"params.{key}: {problem}")


def fmt_value(v: Any) -> str:
    """A parameter value as labels, plans and `sweep list` show it: 0.05, 10, - for None."""
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class TeacherDef:
    """One concrete teacher. `params` is complete (defaults filled, eps resolved) and sorted, so
    two ways of writing the same teacher give the same definition and the same cache entry."""

    label: str
    loss: str
    params: tuple[tuple[str, Any], ...]
    arch: str
    epochs: int
    seed: int

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)


class TeacherEntry(StrictModel):
    """One entry of `grid.teacher_loss`: a loss name, or a mapping with parameters. A list as a
    parameter value means one teacher per value (all combinations when several are lists)."""

    name: str
    params: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=,()-]*$")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _known_loss(v)

    @model_validator(mode="after")
    def _params(self) -> TeacherEntry:
        check_params(self.name, self.params, lists=True)
        if self.label and any(isinstance(v, list) and len(v) > 1 for v in self.params.values()):
            raise ValueError("label: a label names one teacher; drop it or give single values")
        return self

    def expand(self, defaults: TeacherDefaults) -> list[TeacherDef]:
        """One TeacherDef per combination of the listed values."""
        keys = list(self.params)
        choices = [v if isinstance(v, list) else [v] for v in self.params.values()]
        out = []
        for combo in itertools.product(*choices):
            given = dict(zip(keys, combo, strict=True))
            label = self.label or (
                self.name + ("(" + ",".join(f"{k}={fmt_value(v)}" for k, v in given.items()) + ")")
                if given
                else self.name
            )
            out.append(defaults.make(label, self.name, given))
        return out


class TeacherOverride(StrictModel):
    """A member of a teacher set, as changes to the cell's own teacher: unset fields inherit.
    Changing `loss` starts from that loss's default parameters."""

    loss: str | None = None
    params: dict[str, Scalar] = Field(default_factory=dict)
    arch: str | None = None
    epochs: int | None = Field(None, gt=0)
    seed: int | None = None

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return None if v is None else _known_loss(v)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is not None and v not in MODELS:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(MODELS.names())}")
        return v

    @model_validator(mode="after")
    def _params(self) -> TeacherOverride:
        if self.loss is not None:
            check_params(self.loss, self.params)
        return self


class EnsembleSpec(StrictModel):
    size: int | None = Field(None, ge=2, description="default 3; or give members")
    members: list[TeacherOverride] | None = Field(None, min_length=2)

    @model_validator(mode="after")
    def _one_way(self) -> EnsembleSpec:
        if self.size is not None and self.members is not None and self.size != len(self.members):
            raise ValueError(f"size ({self.size}) disagrees with {len(self.members)} members")
        return self

    def overrides(self) -> list[TeacherOverride]:
        if self.members is not None:
            return list(self.members)
        return [TeacherOverride(seed=i) for i in range(self.size or 3)]  # seed offsets


class TeacherSetsSpec(StrictModel):
    robust: TeacherOverride | None = Field(
        None, description="required by clean+robust methods: the file must say how"
    )
    ensemble: EnsembleSpec = EnsembleSpec()


class MissingTeacher(ValueError):
    """A method needs a teacher the file does not define."""


@dataclass(frozen=True)
class TeacherDefaults:
    """What every teacher of the sweep shares unless an entry says otherwise."""

    arch: str
    epochs: int
    seed: int
    eps: float  # the sweep's threat eps, for adversarial teachers that leave eps unset

    def make(
        self,
        label: str,
        loss: str,
        given: dict[str, Any],
        *,
        arch: str | None = None,
        epochs: int | None = None,
        seed: int | None = None,
    ) -> TeacherDef:
        declared = TEACHER_LOSSES.get(loss).params
        params = {k: p.default for k, p in declared.items()} | given
        if "eps" in params and params["eps"] is None:
            params["eps"] = self.eps
        return TeacherDef(
            label=label,
            loss=loss,
            params=tuple(sorted(params.items())),
            arch=arch or self.arch,
            epochs=epochs or self.epochs,
            seed=self.seed if seed is None else seed,
        )


def apply_override(
    base: TeacherDef, o: TeacherOverride, defaults: TeacherDefaults, *, seed_offset: bool = False
) -> TeacherDef:
    """`base` changed by `o`. For ensembles written as {size: K}, seeds are offsets."""
    if o.loss is not None and o.loss != base.loss:
        loss, given = o.loss, dict(o.params)
    else:
        loss = base.loss
        check_params(loss, o.params)
        given = base.params_dict() | o.params
    seed = base.seed + (o.seed or 0) if seed_offset else (base.seed if o.seed is None else o.seed)
    parts = [loss if loss != base.loss else base.label]
    parts += [f"{k}={fmt_value(v)}" for k, v in o.params.items()]
    if o.arch and o.arch != base.arch:
        parts.append(o.arch)
    if seed != base.seed:
        parts.append(f"seed={seed}")
    return defaults.make(
        "+".join(parts),
        loss,
        given,
        arch=o.arch or base.arch,
        epochs=o.epochs or base.epochs,
        seed=seed,
    )


def teacher_set(
    kind: str, primary: TeacherDef, sets: TeacherSetsSpec, defaults: TeacherDefaults
) -> list[TeacherDef]:
    """The teachers one cell needs, the cell's own (primary) teacher first."""
    if kind == "none":
        return []
    if kind == "one":
        return [primary]
    if kind == "clean+robust":
        if sets.robust is None:
            raise MissingTeacher(
                "needs two teachers (clean + robust) but the file defines one; add "
                "teacher_sets.robust, e.g. {loss: trades} or {loss: pgd_at, arch: resnet18}"
            )
        return [primary, apply_override(primary, sets.robust, defaults)]
    if kind == "ensemble":
        from_size = sets.ensemble.members is None
        return [
            apply_override(primary, o, defaults, seed_offset=from_size)
            for o in sets.ensemble.overrides()
        ]
    raise ValueError(f"unknown teacher set kind {kind!r}; allowed: {', '.join(TEACHER_SET_KINDS)}")
