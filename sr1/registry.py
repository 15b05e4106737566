"""A tiny name -> object registry whose lookups fail loudly with the valid names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sr1.errors import NotFoundError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (functions, classes). ``get`` of an unknown name lists the known ones.

    Example::

        ADV = Registry[Callable]("advantage estimator")

        @ADV.register("grpo")
        def grpo(...): ...

        ADV.get("gae")  # NotFoundError: unknown advantage estimator 'gae'; valid: grpo
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise NotFoundError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
