"""Student objectives. Adding one: a module with a Method subclass, and one line below."""

from __future__ import annotations

from ..registry import Registry
from .ard import ARD
from .base import Method
from .ce import CE
from .dkd import DKD
from .kd import KD

METHODS: Registry[type[Method]] = Registry("method")
for _cls in (CE, KD, DKD, ARD):
    METHODS.register(_cls.name)(_cls)

__all__ = ["METHODS", "Method"]
