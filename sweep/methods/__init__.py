"""Student objectives. Adding one: a module with a Method subclass, and one line below."""

from __future__ import annotations

from ..registry import Registry
from .advfunmatch import AdvFunMatch
from .ard import ARD
from .ataka import ATAKA
from .base import Method
from .ce import CE
from .dkd import DKD
from .iad import IAD
from .kd import KD
from .mtard import MTARD
from .pgd_at import PGDAT
from .rslad import RSLAD
from .trades import TRADES

METHODS: Registry[type[Method]] = Registry("method")
for _cls in (CE, PGDAT, TRADES, KD, DKD, ARD, IAD, RSLAD, AdvFunMatch, MTARD, ATAKA):
    METHODS.register(_cls.name)(_cls)

__all__ = ["METHODS", "Method"]
