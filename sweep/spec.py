"""The sweep file: its schema, its defaults, and errors that name the file, the field and what is
allowed.

A sweep file is rejected here, before Ray starts, or not at all: every registry name, range and
cross-field rule is checked at load time.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .attack_defs import TrainAttackSpec
from .attacks import ATTACKS
from .credentials import redact_spec
from .data import DATASETS
from .evaluate import EVAL_ATTACKS, evaluation_attack_names
from .methods import METHODS
from .models import MODELS
from .space import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_REPEATS,
    MAX_STEPS,
    MAX_TRIALS,
    SEED_MAX,
    Domain,
    ParamValue,
    StrictModel,
    contains,
    describe,
    is_searched,
)
from .store import URI_SCHEMES, is_remote
from .teacher_defs import (
    MissingTeacher,
    TeacherDef,
    TeacherDefaults,
    TeacherEntry,
    TeacherSetsSpec,
    teacher_set,
)
from .training import OptimSpec

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Hyperparameters of the optimiser that any cell may search, beside each method's own.
TRAINING_PARAMS = ("lr", "momentum", "weight_decay")
# Their domains are the bounds of the optimiser's own fields (training.OptimSpec).
TRAINING_DOMAIN = {k: Domain.of_field(OptimSpec.model_fields[k]) for k in TRAINING_PARAMS}
# Metrics a trial reports each epoch: the only ones Optuna and ASHA may see (DESIGN §3.3).
TUNABLE_METRICS = {
    "val/clean_acc": "max",
    "val/robust_acc": "max",
    "val/loss": "min",
    "train/loss": "min",
}


_LOC_TAGS = {"range", "fixed", "float", "log_float", "int", "categorical", "one", "many"}


def _check_names(kind: str, registry: Any, names: list[str]) -> list[str]:
    for n in names:
        if n not in registry:
            raise ValueError(f"unknown {kind} {n!r}; allowed: {', '.join(registry.names())}")
    if len(set(names)) != len(names):
        raise ValueError(f"lists a {kind} twice: {names}")
    return names


class DatasetSpec(StrictModel):
    name: str = "digits"
    data_dir: str = "~/.cache/kdsweep/data"
    download: bool = False
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="bundled datasets only")
    split_seed: int = Field(0, ge=0, le=SEED_MAX, description=f"0 to {SEED_MAX:,}")
    augment: bool = True
    strong_augment: Literal["none", "autoaugment"] = Field(
        "none", description="AutoAugment on training batches, after crop/flip"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _check_names("dataset", DATASETS, [v])[0]


class _ArchSpec(StrictModel):
    arch: str = "small_cnn"

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        return _check_names("model", MODELS, [v])[0]


class StudentSpec(_ArchSpec):
    optim: OptimSpec = OptimSpec()


class TeacherSpec(_ArchSpec):
    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    optim: OptimSpec = OptimSpec()
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="defaults to the sweep's seed")


class GridSpec(StrictModel):
    """The factorial axes: every combination is a cell with its own Optuna study."""

    teacher_loss: list[TeacherEntry] = Field(min_length=1)
    method: list[str] = Field(min_length=1)
    train_attack: list[str] = Field(min_length=1)

    @field_validator("method")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        return _check_names("method", METHODS, v)

    @field_validator("train_attack")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        return _check_names("attack", ATTACKS, v)


class ThreatSpec(StrictModel):
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(8 / 255, ge=0, description="pixel scale; data range is [0, 1]")

    @model_validator(mode="after")
    def _in_range(self) -> ThreatSpec:
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(
                f"eps: an L-inf eps is in pixel scale, data in [0, 1]: must be <= 1 (got "
                f"{self.eps}); 8/255 = 0.0314 is the usual CIFAR value"
            )
        return self


class AttackRun(StrictModel):
    """One attack of the evaluation suite: a training attack (`sweep.attacks.ATTACKS`) or an
    evaluation-only one (`sweep.evaluate.EVAL_ATTACKS`). `pgd20` is shorthand for
    {name: pgd, steps: 20}; an evaluation-only attack's variant names stand for their options
    (`autoattack` = AutoAttack standard, `autoattack_apgd` = its APGD-CE + APGD-T subset)."""

    name: str
    steps: int = Field(10, gt=0, le=MAX_STEPS)
    step_size: float | None = Field(None, gt=0, le=1)
    restarts: int = Field(
        1, ge=1, le=MAX_REPEATS, description="robust only if robust under every restart"
    )
    eps: float | None = Field(None, ge=0, description="default: threat.eps")
    norm: Literal["linf", "l2"] | None = Field(None, description="default: threat.norm")
    version: Literal["standard", "apgd"] = Field("standard", description="autoattack only")
    examples: int | None = Field(
        None, gt=0, description="autoattack only: first N examples (it is expensive); null = all"
    )
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            for name, info in EVAL_ATTACKS.items():
                if v in info.variants:
                    return {"name": name, **info.variants[v]}
            m = re.fullmatch(r"([a-z_]+?)(\d+)?", v)
            if not m:
                raise ValueError(f"{v!r} is not an attack name such as 'fgsm' or 'pgd20'")
            out: dict[str, Any] = {"name": m.group(1), "label": v}
            if m.group(2):
                out["steps"] = int(m.group(2))
            return out
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        allowed = evaluation_attack_names()
        if v not in allowed:
            raise ValueError(f"unknown attack {v!r}; allowed: {', '.join(allowed)}")
        return v

    @property
    def evaluation_only(self) -> bool:
        """An attack of EVAL_ATTACKS (AutoAttack): test-set evaluation only."""
        return self.name in EVAL_ATTACKS

    def norms(self) -> tuple[str, ...]:
        return (EVAL_ATTACKS if self.evaluation_only else ATTACKS).get(self.name).norms

    @property
    def key(self) -> str:
        """The metric name's last part: `pgd20`, `pgd20_l2`, `pgd20@0.05`, `pgd20_r5`,
        `autoattack`, `autoattack_apgd`."""
        if self.label:
            return self.label
        if self.evaluation_only:
            key = EVAL_ATTACKS.get(self.name).variant(self)
        else:
            key = self.name + (str(self.steps) if ATTACKS.get(self.name).iterative else "")
        key += "_l2" if self.norm == "l2" else ""
        key += f"@{self.eps:g}" if self.eps is not None else ""
        return key + (f"_r{self.restarts}" if self.restarts > 1 else "")


class EvaluationSpec(StrictModel):
    attacks: list[AttackRun] = Field(
        default_factory=lambda: [AttackRun.model_validate(a) for a in ("fgsm", "pgd20")],
        min_length=1,
    )
    val_attack: AttackRun = Field(default_factory=lambda: AttackRun.model_validate("pgd10"))
    val_examples: int | None = Field(
        1000, gt=0, description="validation subset per epoch; null = all"
    )
    test_examples: int | None = Field(None, gt=0, description="null = the whole test split")
    batch_size: int = Field(256, gt=0, le=MAX_BATCH)


class Objective(StrictModel):
    metric: str = "val/robust_acc"
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def _tunable(cls, v: str) -> str:
        if v.startswith("test/"):
            raise ValueError("tuning on a test metric is not allowed: use a val/ metric")
        if v not in TUNABLE_METRICS:
            raise ValueError(f"unknown metric {v!r}; allowed: {', '.join(TUNABLE_METRICS)}")
        return v


class BudgetSpec(StrictModel):
    trials_per_cell: int = Field(8, gt=0, le=MAX_TRIALS)
    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    early_stopping: bool = Field(
        True, description="ASHA inside each cell; false = every trial trains every epoch"
    )
    grace_period: int = Field(1, gt=0, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: float = Field(3, gt=1)
    asha_weights: dict[str, float] | None = Field(
        None,
        description="several objectives: ASHA ranks trials by this weighted sum of the "
        "objectives (each signed by its mode, so a larger sum is better); required then",
    )
    trial_timeout: float | None = Field(
        None,
        gt=0,
        description="the most wall-clock time one attempt of a trial may run (seconds, or "
        "'90s', '30m', '2h'; its teacher's training included); past it the trial is stopped "
        "and failed with reason `timeout`, and the sweep goes on. null = no limit",
    )

    @field_validator("trial_timeout", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        if isinstance(v, str) and (m := re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", v)):
            return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]
        if isinstance(v, str):
            raise ValueError(
                f"{v!r} is not a duration; allowed: seconds, or e.g. '90s', '30m', '2h'"
            )
        return v

    @model_validator(mode="after")
    def _grace(self) -> BudgetSpec:
        if self.grace_period > self.epochs:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be <= epochs ({self.epochs})"
            )
        return self


class ResourcesSpec(StrictModel):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(
        0,
        ge=0,
        description="a fraction (0.25: four trials share a GPU) or a whole number of GPUs",
    )
    max_concurrent_trials: int | None = Field(None, gt=0, description="null = as many as fit")
    max_failures: int = Field(
        2,
        ge=0,
        description="times a crashed trial (an exception, a lost worker) is retried from its "
        "last checkpoint; a diverged trial is never retried",
    )

    @field_validator("gpus_per_trial")
    @classmethod
    def _ray_gpu_amount(cls, v: float) -> float:
        # Ray schedules fractions of one GPU or whole GPUs, nothing in between
        if v > 1 and v != int(v):
            raise ValueError(f"{v} GPUs: use a fraction below 1 (e.g. 0.25) or a whole number")
        return v


class ComputeSpec(StrictModel):
    """How a trial uses its device. `auto` = the fast path on a GPU, plain fp32 on a CPU (where
    bf16 autocast and channels_last are slower, not faster)."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast for forward passes; auto = bf16 on CUDA, fp32 on CPU"
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="NHWC memory format for conv nets; auto = on with CUDA"
    )
    compile: bool = Field(
        False,
        description="torch.compile the student (compiled once per worker: trial actors are reused)",
    )


class StorageSpec(StrictModel):
    path: str = Field(
        "./sweeps", min_length=1, description="Tune results, checkpoints, teacher cache"
    )
    teachers: str | None = Field(
        None,
        description="teacher cache, shared by sweeps: a folder or a pyarrow URI (s3://, gs://, "
        "file://); null = <path>/teachers",
    )
    optuna: str | None = Field(None, description="null = sqlite file in the sweep's folder")
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    mlflow_experiment: str | None = Field(None, description="null = the sweep's name")

    @field_validator("path", "teachers")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v and "://" in v and v.split("://", 1)[0] not in URI_SCHEMES:
            raise ValueError(
                f"{v!r}: unknown filesystem {v.split('://', 1)[0]!r}; allowed: a folder or a "
                f"URI of {', '.join(f'{s}://' for s in URI_SCHEMES)}"
            )
        return v

    @model_validator(mode="after")
    def _optuna_beside_remote(self) -> StorageSpec:
        if is_remote(self.path) and not self.optuna:
            raise ValueError(
                f"path is {self.path!r}: the default Optuna storage, an SQLite file in the "
                "sweep's folder, cannot live in an object store; set storage.optuna (or "
                "$KDSWEEP_OPTUNA) to a database URL, e.g. postgresql://user@host/optuna"
            )
        return self


class OptunaSpec(StrictModel):
    """How each cell's study samples (samplers.py). Sized to the budget: a cell has a handful of
    trials, so the sampler models after a third of them, not after Optuna's default 10."""

    sampler: Literal["auto", "tpe", "gp", "random", "nsga2"] = Field(
        "auto",
        description="auto = gp with one objective and 16 or more trials a cell, else tpe "
        "(samplers.sampler_kind: where bench/tuning_quality.py measured each winning)",
    )
    n_startup_trials: int | None = Field(
        None,
        ge=0,
        description="trials drawn at random before the sampler models (the paper-setting "
        "first trial counts as one); null = a third of trials_per_cell, at least 1",
    )
    constant_liar: bool | None = Field(
        None,
        description="TPE: count running trials as bad so trials asked together differ; "
        "null = on unless resources.max_concurrent_trials is 1",
    )
    paired: bool = Field(
        True,
        description="cells that differ only in teacher loss draw the same hyperparameters for "
        "the same trial number during the random phase (paired teacher comparison)",
    )
    warm_start: bool = Field(
        True,
        description="offer (enqueue) a sibling cell's best configuration (same method and "
        "attack, other teacher) to a cell still tuning, once per sibling best",
    )


class ChooseSpec(StrictModel):
    """Several objectives: which configuration of a cell's Pareto front is "the best"
    (selection.py): `knee` = the front point nearest the ideal point once each objective is
    scaled to [0, 1] over the front; `constrained` = the best `maximize` (or `minimize`)
    among configurations meeting every `at_least` / `at_most` bound."""

    rule: Literal["knee", "constrained"] = "knee"
    maximize: str | None = None
    minimize: str | None = None
    at_least: dict[str, float] = Field(default_factory=dict)
    at_most: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> ChooseSpec:
        named = [m for m in (self.maximize, self.minimize) if m]
        bounds = {**self.at_least, **self.at_most}
        if self.rule == "knee" and (named or bounds):
            raise ValueError("rule knee takes no maximize/minimize/at_least/at_most")
        if self.rule == "constrained":
            if len(named) != 1:
                raise ValueError("rule constrained needs exactly one of maximize or minimize")
            if not bounds:
                raise ValueError(
                    "rule constrained needs a bound, e.g. at_least: {val/clean_acc: 0.8}"
                )
        return self

    def metrics(self) -> list[str]:
        named = [m for m in (self.maximize, self.minimize) if m]
        return named + list(self.at_least) + list(self.at_most)


class SweepSpec(StrictModel):
    name: str = Field(pattern=NAME_RE)
    seed: int = Field(0, ge=0, le=SEED_MAX, description=f"0 to {SEED_MAX:,}")
    dataset: DatasetSpec = DatasetSpec()
    student: StudentSpec = StudentSpec()
    teacher: TeacherSpec = TeacherSpec()
    grid: GridSpec
    teacher_sets: TeacherSetsSpec = TeacherSetsSpec()
    threat: ThreatSpec = ThreatSpec()
    train_attack: TrainAttackSpec = TrainAttackSpec()
    search_space: dict[str, ParamValue] = Field(default_factory=dict)
    method_search_space: dict[str, dict[str, ParamValue]] = Field(default_factory=dict)
    objective: Annotated[
        Annotated[Objective, Tag("one")] | Annotated[list[Objective], Tag("many")],
        Discriminator(lambda v: "many" if isinstance(v, list) else "one"),
    ] = Objective()
    budget: BudgetSpec = BudgetSpec()
    repeats: int = Field(
        0,
        ge=0,
        le=MAX_REPEATS,
        description="re-run each cell's best configuration (by the validation objective) with "
        "this many new seeds once the cell's tuning has ended, for mean ± std in the report",
    )
    choose: ChooseSpec | None = Field(
        None,
        description="several objectives: the rule that picks a cell's configuration from its "
        "Pareto front; null = knee",
    )
    refit: bool = Field(
        False,
        description="once a cell's tuning has ended, retrain its best configuration on "
        "train + validation (the whole training split, as the literature does) for its final "
        "test numbers, logged as a run of its own linked to the tuned one",
    )
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    compute: ComputeSpec = ComputeSpec()
    storage: StorageSpec = StorageSpec()
    optuna: OptunaSpec = OptunaSpec()

    @field_validator("objective")
    @classmethod
    def _nonempty(cls, v: Objective | list[Objective]) -> Objective | list[Objective]:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one objective")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepSpec:
        methods = [METHODS.get(m) for m in self.grid.method]
        known = set(TRAINING_PARAMS).union(*(m.space for m in methods))
        for key in self.search_space:
            if key not in known:
                raise ValueError(
                    f"search_space.{key}: not a hyperparameter of any method in the grid; "
                    f"allowed: {', '.join(sorted(known))}"
                )
        for mname, space in self.method_search_space.items():
            if mname not in self.grid.method:
                raise ValueError(
                    f"method_search_space.{mname}: not a method of the grid; "
                    f"allowed: {', '.join(self.grid.method)}"
                )
            allowed = set(TRAINING_PARAMS) | set(METHODS.get(mname).space)
            for key in space:
                if key not in allowed:
                    raise ValueError(
                        f"method_search_space.{mname}.{key}: not a hyperparameter of {mname}; "
                        f"allowed: {', '.join(sorted(allowed))}"
                    )
        self._check_domains(methods)
        self._check_batches()
        self._check_teachers(methods)
        self._check_norms()
        self._check_objectives()
        for m in methods:
            if m.needs_attack and self.grid.train_attack == ["none"]:
                raise ValueError(
                    f"grid.method: {m.name!r} needs a training attack for its inner maximisation "
                    f"but grid.train_attack is only 'none'; add fgsm or pgd"
                )
        return self

    def _check_domains(self, methods: list[Any]) -> None:
        """Each search range, choice and fixed value of the file inside the domain of the
        hyperparameter it sets (Method.domain, TRAINING_DOMAIN), for every method it applies to."""
        entries = [(f"search_space.{k}", k, v, methods) for k, v in self.search_space.items()]
        for mname, space in self.method_search_space.items():
            entries += [
                (f"method_search_space.{mname}.{k}", k, v, [METHODS.get(mname)])
                for k, v in space.items()
            ]
        for where, key, value, applies in entries:
            for m in applies:
                if key in TRAINING_DOMAIN:
                    domain, whose = TRAINING_DOMAIN[key], "the optimiser's"
                elif key in m.space:
                    domain, whose = m.domain[key], f"{m.name}'s"
                else:
                    continue
                problem = domain.check_param(value)
                if problem:
                    raise ValueError(
                        f"{where}: {problem} of {whose} {key}; allowed: {domain.allowed()}"
                    )

    def _check_batches(self) -> None:
        """The optimiser's batch sizes (training.OptimSpec) under MAX_BATCH."""
        for where, optim in (
            ("student.optim", self.student.optim),
            ("teacher.optim", self.teacher.optim),
        ):
            if optim.batch_size > MAX_BATCH:
                raise ValueError(
                    f"{where}.batch_size: {optim.batch_size} is over the cap; allowed: 1 to "
                    f"{MAX_BATCH:,}"
                )

    def _check_objectives(self) -> None:
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) < len(metrics):
            raise ValueError(f"objective: a metric is listed twice: {metrics}")
        several = len(metrics) > 1
        if self.choose is not None:
            if not several:
                raise ValueError(
                    "choose: picks a configuration from a Pareto front; with one objective the "
                    "best is its best value: remove choose"
                )
            for m in self.choose.metrics():
                if m not in metrics:
                    raise ValueError(
                        f"choose: {m!r} is not an objective; allowed: {', '.join(metrics)}"
                    )
        w = self.budget.asha_weights
        if w is not None:
            bad = [m for m in w if m not in metrics]
            if bad:
                raise ValueError(
                    f"budget.asha_weights: {bad[0]!r} is not an objective; allowed: "
                    f"{', '.join(metrics)}"
                )
        asha = self.budget.early_stopping and self.budget.grace_period < self.budget.epochs
        if several and asha and not w:
            even = ", ".join(f"{m}: {1 / len(metrics):.2g}" for m in metrics)
            raise ValueError(
                f"budget: with {len(metrics)} objectives ASHA needs a declared scalarisation to "
                f"rank trials by, e.g. asha_weights: {{{even}}}; or early_stopping: false "
                "(every trial trains every epoch)"
            )

    def _check_norms(self) -> None:
        norm = self.threat.norm
        for a in self.grid.train_attack:
            if norm not in ATTACKS.get(a).norms:
                raise ValueError(
                    f"grid.train_attack: {a!r} has no {norm} version; allowed for {norm}: "
                    f"{', '.join(n for n, i in ATTACKS.items() if norm in i.norms)}"
                )
        val = self.evaluation.val_attack
        if val.evaluation_only:
            raise ValueError(
                f"evaluation.val_attack: {val.name} is far too slow for a per-epoch check; use "
                f"e.g. pgd10 ({val.name} belongs in evaluation.attacks)"
            )
        runs = [("evaluation.val_attack", self.evaluation.val_attack)] + [
            (f"evaluation.attacks[{i}]", a) for i, a in enumerate(self.evaluation.attacks)
        ]
        for where, a in runs:
            n = a.norm or norm
            if n not in a.norms():
                raise ValueError(
                    f"{where}: {a.name!r} has no {n} version (it supports "
                    f"{', '.join(a.norms())}); the default suite is "
                    f"[fgsm, pgd20]: for {n} give e.g. `attacks: [pgd20, pgd50]`"
                )

    def _check_teachers(self, methods: list[Any]) -> None:
        variants = [t for e in self.grid.teacher_loss for t in e.expand(self.teacher_defaults())]
        labels = [t.label for t in variants]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(
                f"grid.teacher_loss: names the teacher {', '.join(twice)} twice; give entries "
                f"different params or a `label`"
            )
        for m in methods:
            for t in variants:
                try:
                    teacher_set(m.teacher_set, t, self.teacher_sets, self.teacher_defaults())
                except MissingTeacher as e:
                    raise ValueError(f"grid.method: {m.name!r} {e}") from None
                except ValueError as e:
                    where = "ensemble" if m.teacher_set == "ensemble" else "robust"
                    raise ValueError(f"teacher_sets.{where}: for {t.label}: {e}") from None

    def teacher_defaults(self) -> TeacherDefaults:
        t = self.teacher
        return TeacherDefaults(t.arch, t.epochs, self.teacher_seed(), self.threat.eps)

    def teacher_variants(self) -> dict[str, TeacherDef]:
        """The grid's teachers by label (the first grid axis, lists expanded)."""
        d = self.teacher_defaults()
        return {t.label: t for e in self.grid.teacher_loss for t in e.expand(d)}

    def cell_teachers(self, cell: Cell) -> list[TeacherDef]:
        """Every teacher a cell's trials load, its own grid teacher first."""
        kind = METHODS.get(cell.method).teacher_set
        if kind == "none":
            return []
        primary = self.teacher_variants()[cell.teacher_loss]
        return teacher_set(kind, primary, self.teacher_sets, self.teacher_defaults())

    def all_teachers(self) -> list[TeacherDef]:
        """Each distinct teacher of the sweep once (by content, not by label)."""
        out: dict[TeacherDef, TeacherDef] = {}
        for cell in self.cells():
            for t in self.cell_teachers(cell):
                out.setdefault(replace(t, label=""), t)
        return list(out.values())

    @property
    def objectives(self) -> list[Objective]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    def cells(self) -> list[Cell]:
        """Every combination of the grid, minus meaningless ones (see Cell) and minus cells
        that are another cell of the grid under a second name (`same_cells`)."""
        dropped = {d.key for d, _ in self.same_cells()}
        return [c for c in self._combinations() if c.key not in dropped]

    def same_cells(self) -> list[tuple[Cell, Cell]]:
        """(dropped, kept) pairs: cells of the grid that compute exactly what another cell of
        the grid computes, so a grid holding both would run the cell twice and get identical
        numbers in every metric; it runs once, as the kept one. Two cases:
        - a method that is another method of the grid once it has a training attack
          (`Method.with_attack_is`: `ce` is `pgd_at`, the same loss CE(S(x'), y) and the same
          inner maximisation): kept as that method;
        - two training attacks of the grid that resolve to the same attack with the same
          settings (`cw_inf` trains on the method's own objective, so with PGD's steps it *is*
          `pgd`): kept under the first one's name."""
        aliases = self._attack_aliases()
        out = []
        for c in self._combinations():
            attack = aliases.get(c.train_attack, c.train_attack)
            method = METHODS.get(c.method).with_attack_is
            if attack == "none" or method not in self.grid.method:
                method = c.method
            kept = Cell(c.teacher_loss, method, attack)
            if kept != c:
                out.append((c, kept))
        return out

    def _combinations(self) -> list[Cell]:
        out: dict[str, Cell] = {}
        for method in self.grid.method:
            info = METHODS.get(method)
            for attack in self.grid.train_attack:
                if info.needs_attack and attack == "none":
                    continue  # e.g. ARD without an inner maximisation is not ARD
                losses = list(self.teacher_variants()) if info.teacher_set != "none" else ["none"]
                for loss in losses:
                    cell = Cell(loss, method, attack)
                    out.setdefault(cell.key, cell)
        return list(out.values())

    def _attack_aliases(self) -> dict[str, str]:
        """Grid attacks that run exactly as an earlier grid attack: the same function with the
        same resolved settings (eps, steps, step size, norm, params)."""
        seen: dict[tuple, str] = {}
        out: dict[str, str] = {}
        for name in self.grid.train_attack:
            a = self.train_attack.resolve(name, self.threat.eps, self.threat.norm)
            key = (ATTACKS.get(name).fn, a.eps, a.steps, a.step_size, a.norm, a.params)
            if key in seen:
                out[name] = seen[key]
            else:
                seen[key] = name
        return out

    def cell_space(self, method: str) -> dict[str, Any]:
        """The resolved search space of a method's cells: method defaults, then the file's
        global entries that apply to it, then its per-method overrides."""
        info = METHODS.get(method)
        space: dict[str, Any] = dict(info.space)
        for k, v in self.search_space.items():
            if k in info.space or k in TRAINING_PARAMS:
                space[k] = v
        space.update(self.method_search_space.get(method, {}))
        return space

    def paper_start(self, method: str) -> tuple[dict[str, Any], list[str]]:
        """(params, notes): the method's paper setting (`Method.paper_default`) for the
        hyperparameters its cells search, which each cell's first trial runs before tuning
        starts. A value outside the file's range for it is left to the sampler, and a note
        says so; keys the file fixes keep the file's value."""
        space = self.cell_space(method)
        params, notes = {}, []
        for k, v in METHODS.get(method).paper_default.items():
            if k not in space or not is_searched(space[k]):
                continue
            if contains(space[k], v):
                params[k] = v
            else:
                notes.append(f"{method}: paper's {k}={v} is outside the range {describe(space[k])}")
        return params, notes

    def teacher_seed(self) -> int:
        return self.seed if self.teacher.seed is None else self.teacher.seed

    def tuning_trials(self) -> int:
        return len(self.cells()) * self.budget.trials_per_cell

    def repeat_seed(self, k: int) -> int:
        """Seed of a cell's k-th repeat (1-based): after every tuning trial's seed (seed + index,
        index < trials_per_cell), so a repeat never re-draws a seed the cell was tuned on."""
        return self.seed + self.budget.trials_per_cell + k - 1


@dataclass(frozen=True)
class Cell:
    """One grid cell. `teacher_loss` is the label of a grid teacher (`mse`,
    `mcmi(lambda=0.1)`). Methods without a teacher ignore that axis: their cells carry
    teacher_loss 'none' and are run once, not once per teacher loss."""

    teacher_loss: str
    method: str
    train_attack: str

    @property
    def key(self) -> str:
        return f"{self.teacher_loss}.{self.method}.{self.train_attack}"


class SpecError(Exception):
    """A sweep file that cannot be run; `problems` are (field, message) pairs."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(
            f"{self.file}: {field}: {msg}" if field else f"{self.file}: {msg}"
            for field, msg in self.problems
        )


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _LOC_TAGS or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        field = _field_path(tuple(e["loc"]))
        if e["type"] == "missing":
            msg = "required field is missing"
        m = re.match(r"([\w./\[\]-]+): (.*)", msg, re.S)
        if m:  # model-level checks name their own field, relative to where they sit
            field = f"{field}.{m.group(1)}" if field else m.group(1)
            msg = m.group(2)
        if e["type"] not in ("missing", "value_error", "assertion_error") and "input" in e:
            given = repr(e["input"])
            msg += f" (got {given if len(given) <= 200 else given[:200] + '...'})"
        out.append((field, msg))
    return out


def parse_spec(data: Any, file: str = "<sweep>") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(file, [("", f"a sweep file is a YAML mapping, got {type(data).__name__}")])
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(file, _problems(e)) from None


# Where a cluster points every node (cluster/README.md): the environment overrides the file's
# `storage:` so one sweep file runs on a laptop and on a cluster unchanged, and credentials stay
# in the platform's environment, never in the file.
STORAGE_ENV = {
    "KDSWEEP_STORAGE": "path",
    "KDSWEEP_TEACHERS": "teachers",
    "KDSWEEP_OPTUNA": "optuna",
    "MLFLOW_TRACKING_URI": "mlflow_tracking_uri",
}


def apply_storage_env(data: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    """Put the STORAGE_ENV variables that are set into `data["storage"]`; returns the fields
    they replaced, for the plan to say so."""
    environ = dict(os.environ) if environ is None else environ
    changed = []
    for var, field in STORAGE_ENV.items():
        if environ.get(var):
            storage = data.setdefault("storage", {}) or {}
            data["storage"] = storage
            if isinstance(storage, dict):
                storage[field] = environ[var]
                changed.append(f"storage.{field} from ${var}")
    return changed


# What a sweep file may be: a few KB in practice. The caps stop a hostile or broken file (a YAML
# alias bomb expands exponentially) before anything builds, validates or prints the expansion.
MAX_FILE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # values once aliases are expanded


def _check_nodes(root: yaml.Node, file: str) -> None:
    """Duplicate keys (YAML's last-one-wins would silently drop a block) and the expanded size,
    on the composed node graph: each distinct node is visited once, so an alias bomb costs as
    much as its text, while its expanded size is summed exactly."""
    size: dict[int, int] = {}

    def walk(node: yaml.Node, where: str) -> int:
        if id(node) in size:
            return size[id(node)]
        size[id(node)] = MAX_YAML_NODES + 1  # a node met again while in it: a cycle
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                if key is not None and k.tag != "tag:yaml.org,2002:merge":
                    line = k.start_mark.line + 1
                    if key in seen:
                        raise SpecError(
                            file,
                            [
                                (
                                    where,
                                    f"duplicate key {key!r} (lines {seen[key]} and {line}); "
                                    "allowed: each key once",
                                )
                            ],
                        )
                    seen[key] = line
                child = f"{where}.{key}" if where else str(key)
                total += walk(k, child) + walk(v, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                total += walk(v, f"{where}[{i}]")
        if total > MAX_YAML_NODES:
            raise SpecError(
                file,
                [
                    (
                        where,
                        f"expands to more than {MAX_YAML_NODES:,} values (YAML aliases?); "
                        f"allowed: at most {MAX_YAML_NODES:,}",
                    )
                ],
            )
        size[id(node)] = total
        return total

    walk(root, "")


class _SweepLoader(yaml.SafeLoader):
    """Safe YAML that reads `1e-3`, `5e-4` and `1.0e30` as the numbers YAML 1.2 (and every
    researcher) says they are: PyYAML follows YAML 1.1, which needs a dot and a signed exponent
    (`1.0e-3`), and would hand the strict spec a string."""


_SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_yaml(raw: bytes, file: str) -> Any:
    """The one loader of sweep files (and of the sweep.yaml a run stores): UTF-8, safe YAML,
    no duplicate key, bounded size. Problems raise SpecError naming the file and, where there
    is one, the field and line."""
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(
            file, [("", f"{len(raw):,} bytes; allowed: a sweep file of at most {MAX_FILE_BYTES:,}")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            file,
            [("", f"not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start}; allowed: UTF-8")],
        ) from None
    loader = _SweepLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, file)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)[:200]
        raise SpecError(file, [("", f"YAML does not parse: {where}{problem}")]) from None
    finally:
        loader.dispose()


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; any problem raises SpecError naming file and field.
    Storage locations set in the environment (STORAGE_ENV) override the file's."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [("", "no such file")])
    data = read_yaml(path.read_bytes(), str(path))
    if isinstance(data, dict):
        for change in apply_storage_env(data):
            print(f"{path}: {change}", file=sys.stderr)
    return parse_spec(data, str(path))


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    # warnings=False: pydantic warns about the tagged fixed-or-range union although it
    # serialises it correctly (checked by tests/test_spec.py round trip)
    return spec.model_dump(mode="json", warnings=False)


def dump_spec(spec: SweepSpec) -> str:
    """The fully resolved sweep (every default written out), for MLflow and resume; storage
    URLs without their passwords (credentials.py: resume takes them from the environment)."""
    return yaml.safe_dump(spec_to_dict(redact_spec(spec)), sort_keys=False)
