"""Student objectives. Adding one: a module with a Method subclass, and one line below."""

from __future__ import annotations

from ..registry import Registry
from .advfunmatch import AdvFunMatch
from .ard import ARD
from .ataka import ATAKA
from .base import Method
from .cap import CAP
from .ce import CE
from .dkd import DKD
from .gacd import GACD
from .iad import IAD
from .kd import KD
from .mtard import MTARD
from .pgd_at import PGDAT
from .rslad import RSLAD
from .trades import TRADES

METHODS: Registry[type[Method]] = Registry("method")
_ALL = (CE, PGDAT, TRADES, CAP, KD, DKD, ARD, IAD, RSLAD, AdvFunMatch, MTARD, ATAKA, GACD)
for _cls in _ALL:
    METHODS.register(_cls.name)(_cls)

__all__ = ["METHODS", "Method"]
