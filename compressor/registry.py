"""A name -> object registry: a method (or any other plug-in) joins by registering under a name,
never by a new `if name == ...` elsewhere."""
from __future__ import annotations

from .errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items = {}

    def register(self, name: str, item=None):
        """`registry.register("x", obj)`, or `@registry.register("x")` on a class or function.
        A second registration under the same name is refused (a plug-in must not silently replace
        another)."""
        def add(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = obj
            return obj
        return add if item is None else add(item)

    def get(self, name: str):
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}: use {self.choices()}") from None

    def names(self) -> tuple:
        """Registered names, in registration order."""
        return tuple(self._items)

    def choices(self) -> str:
        return " or ".join(", ".join(map(repr, self._items)).rsplit(", ", 1))

    def __contains__(self, name):
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)
