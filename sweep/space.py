"""Search-space parameters: the four kinds a sweep file may use.

Why a module of its own: methods declare their default ranges with these types, and the sweep
file's schema (spec.py) validates user overrides with the same types. Their Optuna
distributions are made by the searcher (search.distribution): no Optuna import here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys, naming the allowed ones (typos like
    `temprature` must fail loudly, not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
