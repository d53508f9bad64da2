"""A name -> function table, so a config string picks an algorithm variant.

A new advantage estimator, policy loss, KL estimator or aggregation is one decorated function plus
one config file; nothing that calls it changes.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError):
    """A registry lookup for a name nobody registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError's default str() wraps the message in quotes
        return str(self.args[0])


class Registry(Generic[F]):
    """Functions registered under names: ``@REG.register("x")`` then ``REG.get("x")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what the entries are, for error messages ("advantage estimator")
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        if name not in self._fns:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._fns))}"
            )
        return self._fns[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns
