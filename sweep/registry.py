"""A tiny name -> object registry, one per kind of thing (teacher loss, method, attack, ...).

Why: the sweep file names things by string; the schema validates those strings against the
registries, and `sweep list` shows what each registry holds. Everything is registered the same
way, by a decorator at its definition, so adding a method (a loss, an attack, ...) is one new
definition and nothing to edit elsewhere:

    @METHODS.register("kd")
    class KD(Method): ...

    @ATTACKS.register("fgsm", summary="FGSM, one step of size eps")
    def fgsm(model, x, objective, *, eps, ...): ...

A registry built with `entry` (a record type) stores `entry(name, obj, **facts)`, the decorated
object with the facts given to `register` (an attack's summary and norms, a dataset's shape);
one without stores the object itself, and a class gets its key as its `name` attribute, so the
name is written once, in the decorator. The decorator returns the object unchanged: one function
may be registered under two names (`pgd` and `cw_inf`). Names are listed sorted, so the order in
which modules register changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
D = TypeVar("D")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry: Callable[..., T] | None = None) -> None:
        self.kind = kind
        self.entry = entry
        self._items: dict[str, T] = {}

    def register(self, name: str, **facts: Any) -> Callable[[D], D]:
        """Decorator: register the decorated object under `name` (see the module docstring)."""
        if facts and self.entry is None:
            raise TypeError(f"{self.kind} registry takes no facts beside the name: {sorted(facts)}")

        def add(obj: D) -> D:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.entry is not None:
                self._items[name] = self.entry(name, obj, **facts)
                return obj
            if isinstance(obj, type):
                own = obj.__dict__.get("name")
                if own is not None and own != name:
                    raise ValueError(f"{self.kind} {obj.__name__} is named {own!r}, not {name!r}")
                obj.name = name  # type: ignore[attr-defined]
            self._items[name] = obj  # type: ignore[assignment]
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]
