"""Search-space parameters: the four kinds a sweep file may use.

Why a module of its own: methods declare their default ranges with these types, and the sweep
file's schema (spec.py) validates user overrides with the same types. Their Optuna
distributions are made by the searcher (search.distribution): no Optuna import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic.fields import FieldInfo

# Seeds: Optuna's samplers seed numpy's RandomState, which takes 0 <= seed < 2**32, with
# `seed * 1000 + cell position` (samplers.make_sampler); trials, repeats and ensemble members
# add small offsets. 4,000,000 leaves room for 294,967 cells.
SEED_MAX = 4_000_000
# Caps of the sweep file's sizes: generous for research, while a typo (an extra 000) is refused
# rather than run for a year.
MAX_TRIALS = 10_000  # budget.trials_per_cell
MAX_EPOCHS = 10_000  # budget.epochs, teacher and fine-tune epochs
MAX_STEPS = 10_000  # attack steps (training and evaluation)
MAX_BATCH = 65_536  # every batch size
MAX_REPEATS = 1_000  # seed repeats, attack restarts


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys, naming the allowed ones (typos like
    `temprature` must fail loudly, not be ignored)."""

    # strict: a YAML `true` is not the integer 1, nor "8" the number 8 (issue 19, item 18)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            unknown = [k for k in data if k not in allowed]
            if unknown:
                import difflib

                hints = []
                for k in unknown:
                    close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                    hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                raise ValueError(
                    f"unknown field {', '.join(hints)}; allowed: {', '.join(sorted(allowed))}"
                )
        return data


class _Range(StrictModel):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not be greater than high ({self.high})")
        return self


class FloatParam(_Range):
    type: Literal["float"] = "float"


class LogFloatParam(_Range):
    type: Literal["log_float"] = "log_float"

    @model_validator(mode="after")
    def _positive(self) -> LogFloatParam:
        if self.low <= 0:
            raise ValueError(f"a log range must have low > 0 (got low={self.low})")
        return self


class IntParam(StrictModel):
    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not be greater than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must have low > 0 (got low={self.low})")
        return self


class CategoricalParam(StrictModel):
    type: Literal["categorical"] = "categorical"
    choices: list[float | int | str | bool] = Field(min_length=1)


SearchParam = Annotated[
    FloatParam | LogFloatParam | IntParam | CategoricalParam, Field(discriminator="type")
]


def _fixed_or_range(v: Any) -> str:
    return "range" if isinstance(v, dict) else "fixed"


# A fixed value (a plain number or string) is also allowed wherever a SearchParam is: what a
# search-space entry of the sweep file holds (a mapping is a range, anything else a fixed value).
ParamValue = Annotated[
    Annotated[SearchParam, Tag("range")] | Annotated[float | int | bool | str, Tag("fixed")],
    Discriminator(_fixed_or_range),
]


def is_searched(p: ParamValue) -> bool:
    return isinstance(p, FloatParam | LogFloatParam | IntParam | CategoricalParam)


def describe(p: ParamValue) -> str | float | int | bool:
    """A short human-readable form, for plans and `sweep list`."""
    if isinstance(p, LogFloatParam):
        return f"log[{p.low:g}, {p.high:g}]"
    if isinstance(p, FloatParam):
        return f"[{p.low:g}, {p.high:g}]"
    if isinstance(p, IntParam):
        return f"int[{p.low}, {p.high}]" + (" log" if p.log else "")
    if isinstance(p, CategoricalParam):
        return "{" + ", ".join(map(str, p.choices)) + "}"
    return p


def contains(p: ParamValue, value: Any) -> bool:
    """Whether a searched range admits `value` (a fixed value admits only itself)."""
    if isinstance(p, CategoricalParam):
        return value in p.choices
    if isinstance(p, _Range | IntParam):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return p.low <= value <= p.high and (not isinstance(p, IntParam) or value == int(value))
    return p == value


@dataclass(frozen=True)
class Domain:
    """Where a hyperparameter makes sense at all (temperature > 0, a convex weight in [0, 1]),
    as opposed to the search range a method suggests inside it. Declared beside the
    hyperparameter (`Method.domain`); the sweep file's ranges, choices and fixed values are
    checked against it before any trial starts (`check_param`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...: a temperature of 0 divides by zero
    high_open: bool = False  # ..., high): a momentum of 1 never forgets
    integer: bool = False
    doc: str = ""

    @classmethod
    def of_field(cls, f: FieldInfo, doc: str = "") -> Domain:
        """The bounds a pydantic field declares (Field(gt=0), Field(ge=0, lt=1)), so a rule
        written on a field of the file is not written again here."""
        low = high = None
        low_open = high_open = False
        for m in f.metadata:
            if isinstance(m, at.Gt | at.Ge):
                low, low_open = float(m.gt if isinstance(m, at.Gt) else m.ge), isinstance(m, at.Gt)
            elif isinstance(m, at.Lt | at.Le):
                high = float(m.lt if isinstance(m, at.Lt) else m.le)
                high_open = isinstance(m, at.Lt)
        return cls(low, high, low_open, high_open, f.annotation is int, doc)

    def allowed(self) -> str:
        """The domain as a message shows it: `> 0`, `[0, 1]`, `[0, 1)`, `any number`."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {lo}{self.low:g}, {self.high:g}{hi}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"any finite {'integer' if self.integer else 'number'}"
        return text + (f" ({self.doc})" if self.doc else "")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check_param(self, p: ParamValue) -> str | None:
        """None when every value `p` can take lies in the domain, else what was given."""
        if isinstance(p, CategoricalParam):
            values = list(p.choices)
        elif isinstance(p, _Range | IntParam):
            if self.integer and not isinstance(p, IntParam):
                return f"{describe(p)} is a float range; give {{type: int, low, high}}"
            values = [p.low, p.high]  # the domain is an interval: its ends decide
        else:
            values = [p]
        bad = [v for v in values if not self.contains(v)]
        if not bad:
            return None
        number = not isinstance(bad[0], bool) and isinstance(bad[0], int | float)
        what = f"{bad[0]!r} is {'outside the domain' if number else 'not a number'}"
        if isinstance(p, CategoricalParam):
            return f"choice {what}"
        return (
            f"{describe(p)} reaches {bad[0]!r}, outside the domain"
            if is_searched(p) and number
            else what
        )
