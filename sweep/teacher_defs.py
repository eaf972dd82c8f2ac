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

Where a teacher starts (an entry, or a teacher-set member, may say):

        - {name: trades, label: trades_ft, finetune: {from: ce, epochs: 5, optim: {lr: 0.01}}}
        - {name: trades, label: trades_wrn,
           checkpoint: {uri: s3://b/trades.pt, sha256: <64 hex>, arch: wrn34_10,
                        format: robustbench}}
        - mcmi                               # its paper's recipe: fine-tunes {name: ce}
        - {name: mcmi, start: scratch, params: {centroids: ema}}   # from scratch instead

`finetune.from` is itself a teacher entry (a loss name or a mapping, with its own params, arch,
epochs, seed, finetune or checkpoint), self-contained: it names no other grid label, and gets
the sweep's teacher defaults for what it does not say. `finetune.epochs` (default: the loss's
recipe, else `teacher.epochs`) and `finetune.optim` (fields of `teacher.optim` to override) are
the fine-tuning's. A loss with a default start (TeacherLoss.default_start: `mcmi`) fine-tunes by
that recipe unless the entry says `start: scratch`; a `finetune` mapping overrides the recipe
field by field. A `checkpoint` teacher is loaded, not trained (epochs 0): its loss name only
documents how it was trained; its sha256 (and format) is its identity, not its URI.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .checkpoint_formats import FORMATS
from .models import MODELS
from .space import MAX_BATCH, MAX_EPOCHS, SEED_MAX, StrictModel
from .teacher_losses import TEACHER_LOSSES
from .training import OptimSpec

Scalar = float | int | str | None  # str: a choice parameter (mcmi's centroids)
# `start:` of an entry. default: the loss's default start (TeacherLoss.default_start: mcmi
# fine-tunes ce; other losses train from scratch), or the entry's finetune/checkpoint; scratch:
# from scratch even where the loss has a default start. A value, not `finetune: null`, so that a
# dumped sweep (every field written out) parses back to the same teachers.
Start = Literal["default", "scratch"]
# What a method says about its teachers (Method.teacher_set).
TEACHER_SET_KINDS = ("none", "one", "clean+robust", "ensemble")


def _known_arch(v: str) -> str:
    if v not in MODELS:
        raise ValueError(f"unknown model {v!r}; allowed: {', '.join(MODELS.names())}")
    return v


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


def _check_optim(optim: dict[str, Any]) -> None:
    """`finetune.optim` keys and values as `teacher.optim` would take them."""
    allowed = list(OptimSpec.model_fields)  # the fields of teacher.optim, which it may override
    unknown = sorted(set(optim) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field {unknown}; allowed: {', '.join(allowed)}")
    spec = OptimSpec.model_validate(optim)
    if spec.batch_size > MAX_BATCH:
        raise ValueError(
            f"batch_size: {spec.batch_size} is over the cap; allowed: 1 to {MAX_BATCH:,}"
        )


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint to load a teacher from. Equality (and the teacher's identity) is by content,
    sha256 and format: the URI says only where the bytes are today (compare=False)."""

    sha256: str
    format: str
    uri: str = field(compare=False)


@dataclass(frozen=True)
class TeacherDef:
    """One concrete teacher. `params` is complete (defaults filled, eps resolved) and sorted, so
    two ways of writing the same teacher give the same definition and the same cache entry.

    Where it starts: from scratch (`init` and `checkpoint` None); fine-tuned from `init` (its
    parent, trained or loaded itself) for `epochs` with `optim` (sorted overrides of the sweep's
    teacher.optim); or loaded from `checkpoint` (epochs 0). Frozen and hashable all the way
    down, so teachers can be deduplicated by content (`replace(t, label="")`)."""

    label: str
    loss: str
    params: tuple[tuple[str, Any], ...]
    arch: str
    epochs: int
    seed: int
    init: TeacherDef | None = None
    optim: tuple[tuple[str, Any], ...] | None = None
    checkpoint: CheckpointRef | None = None

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def source(self) -> str:
        """trained | finetuned | checkpoint: what the teacher's MLflow run says."""
        if self.checkpoint is not None:
            return "checkpoint"
        return "finetuned" if self.init is not None else "trained"

    def optim_dict(self) -> dict[str, Any]:
        return dict(self.optim or ())


class CheckpointSpec(StrictModel):
    """`checkpoint:` of a teacher entry: the file, its sha256, and how to read it."""

    uri: str = Field(min_length=1, description="a local path, file://, s3://, gs://, ...")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="of the file's bytes")
    arch: str | None = Field(None, description="our architecture to load it into")
    format: Literal["state_dict", "robustbench"] = "state_dict"

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        return None if v is None else _known_arch(v)

    def ref(self) -> CheckpointRef:
        assert self.format in FORMATS
        return CheckpointRef(self.sha256.lower(), self.format, self.uri)


class FinetuneSpec(StrictModel):
    """`finetune:` of a teacher entry. In the file the parent is `from` (a Python keyword,
    hence `start_from` here)."""

    start_from: TeacherEntry | None = None
    epochs: int | None = Field(None, gt=0, le=MAX_EPOCHS)
    optim: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if "from" in data:
                data["start_from"] = data.pop("from")
            unknown = sorted(set(data) - {"start_from", "epochs", "optim"})
            if unknown:
                raise ValueError(f"unknown field {unknown}; allowed: epochs, from, optim")
        return data

    @field_validator("optim")
    @classmethod
    def _optim(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_optim(v)
        return v

    @field_validator("start_from")
    @classmethod
    def _one_parent(cls, v: TeacherEntry | None) -> TeacherEntry | None:
        if v is not None and any(isinstance(x, list) for x in v.params.values()):
            raise ValueError("(from) a fine-tune starts from one teacher: give single values")
        return v


class TeacherEntry(StrictModel):
    """One entry of `grid.teacher_loss`: a loss name, or a mapping with parameters. A list as a
    parameter value means one teacher per value (all combinations when several are lists).
    `arch`, `epochs`, `seed` override the sweep's teacher defaults for this teacher; `finetune`
    and `checkpoint` say where it starts (module docstring)."""

    name: str
    params: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=,()-]*$")
    arch: str | None = None
    epochs: int | None = Field(None, gt=0, le=MAX_EPOCHS)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    start: Start = "default"
    finetune: FinetuneSpec | None = None
    checkpoint: CheckpointSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _known_loss(v)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        return None if v is None else _known_arch(v)

    @model_validator(mode="after")
    def _params(self) -> TeacherEntry:
        check_params(self.name, self.params, lists=True)
        if self.label and any(isinstance(v, list) and len(v) > 1 for v in self.params.values()):
            raise ValueError("label: a label names one teacher; drop it or give single values")
        check_start(self)
        return self

    def expand(self, defaults: TeacherDefaults) -> list[TeacherDef]:
        """One TeacherDef per combination of the listed values."""
        keys = list(self.params)
        choices = [v if isinstance(v, list) else [v] for v in self.params.values()]
        out = []
        for combo in itertools.product(*choices):
            given = dict(zip(keys, combo, strict=True))
            label = self.label or self._label(given)
            out.append(
                resolve(
                    defaults,
                    label,
                    self.name,
                    given,
                    arch=self.arch,
                    epochs=self.epochs,
                    seed=self.seed,
                    finetune=self.finetune,
                    scratch=self.start == "scratch",
                    checkpoint=self.checkpoint,
                )
            )
        return out

    def _label(self, given: dict[str, Any]) -> str:
        """name(k=v,...), with where it starts when the entry says so: from=<parent label>,
        from=scratch (a loss with a default start, opted out), sha256=<8 hex> (a checkpoint)."""
        parts = [f"{k}={fmt_value(v)}" for k, v in given.items()]
        if self.checkpoint is not None:
            parts.append(f"sha256={self.checkpoint.sha256.lower()[:8]}")
        elif self.finetune is not None and self.finetune.start_from is not None:
            parent = self.finetune.start_from
            parts.append(f"from={parent.label or parent._label(dict(parent.params))}")
        elif self.start == "scratch" and TEACHER_LOSSES.get(self.name).default_start:
            parts.append("from=scratch")
        return self.name + (f"({','.join(parts)})" if parts else "")

    def resolve_one(self, defaults: TeacherDefaults) -> TeacherDef:
        (t,) = self.expand(defaults)  # FinetuneSpec allows no lists in `from`
        return t


def check_start(entry: TeacherEntry | TeacherOverride) -> None:
    """A teacher starts one way: from scratch, a fine-tune, or a checkpoint (loaded: no epochs,
    seed or fine-tuning)."""
    checkpoint, finetune = entry.checkpoint, entry.finetune
    if entry.start == "scratch" and (checkpoint is not None or finetune is not None):
        raise ValueError("start: scratch contradicts finetune/checkpoint; give one")
    if checkpoint is None:
        return
    if finetune is not None:
        raise ValueError(
            "give checkpoint or finetune, not both (to fine-tune a checkpoint, put it under "
            "finetune.from)"
        )
    if entry.epochs is not None or entry.seed is not None:
        raise ValueError("epochs/seed: a teacher loaded from a checkpoint is not trained")
    if entry.arch and checkpoint.arch and entry.arch != checkpoint.arch:
        raise ValueError(f"arch ({entry.arch}) disagrees with checkpoint.arch ({checkpoint.arch})")


def resolve(
    defaults: TeacherDefaults,
    label: str,
    loss: str,
    given: dict[str, Any],
    *,
    arch: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    finetune: FinetuneSpec | None = None,
    scratch: bool = False,
    checkpoint: CheckpointSpec | None = None,
) -> TeacherDef:
    """The TeacherDef of one teacher: loaded, fine-tuned (explicitly or by the loss's default
    start) or trained from scratch. A fine-tune's parent gets `arch` (else the sweep's) unless it
    sets its own, and the child has its parent's architecture."""
    if checkpoint is not None:
        return defaults.make(
            label,
            loss,
            given,
            arch=checkpoint.arch or arch,
            epochs=0,
            seed=seed,
            checkpoint=checkpoint.ref(),
        )
    recipe = TEACHER_LOSSES.get(loss).default_start
    if finetune is None and (scratch or recipe is None):
        return defaults.make(label, loss, given, arch=arch, epochs=epochs, seed=seed)
    ft = finetune or FinetuneSpec()
    if epochs is not None:
        raise ValueError(f"epochs: {label} is fine-tuned; give finetune.epochs")
    parent_entry = ft.start_from
    if parent_entry is None:
        if recipe is None:
            raise ValueError(f"finetune.from: required ({loss!r} has no default start)")
        parent_entry = TeacherEntry(name=recipe.start_from)
    try:
        parent = parent_entry.resolve_one(replace(defaults, arch=arch or defaults.arch))
    except ValueError as e:
        raise ValueError(f"finetune.from: {e}") from None
    if arch and parent.arch != arch:
        raise ValueError(f"arch ({arch}): a fine-tuned teacher has its parent's ({parent.arch})")
    optim = (recipe.optim_for(parent.arch) if recipe else {}) | ft.optim
    ft_epochs = ft.epochs or (recipe.epochs if recipe else defaults.epochs)
    return defaults.make(
        label,
        loss,
        given,
        arch=parent.arch,
        epochs=ft_epochs,
        seed=seed,
        init=parent,
        optim=tuple(sorted(optim.items())),
    )


class TeacherOverride(StrictModel):
    """A member of a teacher set, as changes to the cell's own teacher: unset fields inherit.
    Changing `loss` starts from that loss's default parameters (and its default start: `mcmi`
    fine-tunes a CE teacher); `finetune` / `checkpoint` as in a grid entry (module docstring):
    e.g. a robust teacher loaded from RobustBench."""

    loss: str | None = None
    params: dict[str, Scalar] = Field(default_factory=dict)
    arch: str | None = None
    epochs: int | None = Field(None, gt=0, le=MAX_EPOCHS)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    start: Start = "default"
    finetune: FinetuneSpec | None = None
    checkpoint: CheckpointSpec | None = None

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return None if v is None else _known_loss(v)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        return None if v is None else _known_arch(v)

    @model_validator(mode="after")
    def _params(self) -> TeacherOverride:
        if self.loss is not None:
            check_params(self.loss, self.params)
        check_start(self)
        return self

    @property
    def restarts(self) -> bool:
        """Whether it says where the teacher starts (then it is resolved afresh)."""
        return self.checkpoint is not None or self.finetune is not None or self.start == "scratch"


FinetuneSpec.model_rebuild()


class EnsembleSpec(StrictModel):
    size: int | None = Field(None, ge=2, le=100, description="default 3; or give members")
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
        init: TeacherDef | None = None,
        optim: tuple[tuple[str, Any], ...] | None = None,
        checkpoint: CheckpointRef | None = None,
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
            epochs=self.epochs if epochs is None else epochs,  # 0: a loaded checkpoint
            seed=self.seed if seed is None else seed,
            init=init,
            optim=optim,
            checkpoint=checkpoint,
        )


def apply_override(
    base: TeacherDef, o: TeacherOverride, defaults: TeacherDefaults, *, seed_offset: bool = False
) -> TeacherDef:
    """`base` changed by `o`. For ensembles written as {size: K}, seeds are offsets.

    A member that changes the loss or says where it starts is resolved afresh (`resolve`). One
    that changes only params/epochs/seed of a fine-tuned base stays a fine-tune of the same
    recipe, a changed seed re-seeding the whole chain (ensemble members differ from the start);
    a loaded base cannot be re-seeded, re-trained or moved to another architecture."""
    new_loss = o.loss is not None and o.loss != base.loss
    seed = base.seed + (o.seed or 0) if seed_offset else (base.seed if o.seed is None else o.seed)
    parts = [o.loss if new_loss else base.label]
    parts += [f"{k}={fmt_value(v)}" for k, v in o.params.items()]
    if o.arch and o.arch != base.arch:
        parts.append(o.arch)
    if seed != base.seed:
        parts.append(f"seed={seed}")
    if o.checkpoint is not None:
        parts.append(f"sha256={o.checkpoint.sha256.lower()[:8]}")
    label = "+".join(parts)
    loss = o.loss if new_loss else base.loss
    if not new_loss:
        check_params(loss, o.params)
    given = dict(o.params) if new_loss else base.params_dict() | o.params
    derived = base.init is not None or base.checkpoint is not None
    if new_loss or o.restarts:
        changed_seed = o.seed is not None and seed != base.seed
        fine_tunes = o.checkpoint is None and (
            o.finetune is not None
            or (o.start != "scratch" and TEACHER_LOSSES.get(loss).default_start)
        )
        return resolve(
            defaults,
            label,
            loss,
            given,
            arch=o.arch or base.arch,
            # a scratch teacher inherits the base's epochs unless the base's are a fine-tune's
            epochs=o.epochs if (fine_tunes or o.checkpoint or derived) else o.epochs or base.epochs,
            seed=seed if (changed_seed or not derived) else None,
            finetune=o.finetune,
            scratch=o.start == "scratch",
            checkpoint=o.checkpoint,
        )
    if base.checkpoint is not None:
        if o.params or o.arch or o.epochs or seed != base.seed:
            raise ValueError(
                f"{base.label} is loaded from a checkpoint: it has no seed, epochs or params to "
                "change (an ensemble needs members, e.g. other checkpoints)"
            )
        return base
    arch = o.arch or base.arch
    init, optim = base.init, base.optim
    if init is not None:
        init = _reseed(_rearch(init, arch), seed - base.seed)
        recipe = TEACHER_LOSSES.get(loss).default_start
        if recipe is not None and base.optim_dict() == recipe.optim_for(base.arch):
            optim = tuple(sorted(recipe.optim_for(arch).items()))  # the recipe's, for this arch
    return defaults.make(
        label,
        loss,
        given,
        arch=arch,
        epochs=o.epochs or base.epochs,
        seed=seed,
        init=init,
        optim=optim,
    )


def _rearch(t: TeacherDef, arch: str) -> TeacherDef:
    """`t` and its parents on `arch`; a loaded parent cannot change architecture."""
    if t.arch == arch:
        return t
    if t.checkpoint is not None:
        raise ValueError(f"arch: {t.label} is loaded from a checkpoint of {t.arch}, not {arch}")
    init = _rearch(t.init, arch) if t.init is not None else None
    return replace(t, arch=arch, init=init)


def _reseed(t: TeacherDef, delta: int) -> TeacherDef:
    """`t` and its parents trained with seeds shifted by `delta` (loaded ones stay as they are)."""
    if delta == 0 or t.checkpoint is not None:
        return t
    init = _reseed(t.init, delta) if t.init is not None else None
    return replace(t, seed=t.seed + delta, init=init)


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


def teacher_generations(teachers: list[TeacherDef]) -> list[list[TeacherDef]]:
    """Every teacher and the teachers they are fine-tuned from, each once (by content), grouped
    by depth: those that start from nothing first, then those fine-tuned from them, and so on.
    Each group can be made in parallel once the groups before it exist."""
    seen: dict[TeacherDef, TeacherDef] = {}
    depth: dict[TeacherDef, int] = {}

    def walk(t: TeacherDef) -> int:
        key = replace(t, label="")
        if key not in depth:
            depth[key] = 0 if t.init is None else 1 + walk(t.init)
            seen[key] = t
        return depth[key]

    for t in teachers:
        walk(t)
    levels = sorted(set(depth.values()))
    return [[seen[k] for k in seen if depth[k] == d] for d in levels]
