"""Student objectives. Adding one: a module with a Method subclass decorated with
`@METHODS.register("<name>")`, and its import below (importing a module registers its method)."""

from __future__ import annotations

from . import (  # noqa: F401
    advfunmatch,
    ard,
    ataka,
    cap,
    ce,
    dkd,
    gacd,
    iad,
    kd,
    mtard,
    pgd_at,
    rslad,
    trades,
)
from .base import METHODS, Method

__all__ = ["METHODS", "Method"]
