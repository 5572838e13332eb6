"""Name -> implementation tables for the run-config keys that choose a mechanism.

The accountant, the aggregation rule and the privacy mode are each picked by name
from a :class:`Registry` instead of a string if-chain, so adding one is one module
plus one :meth:`Registry.register` call, and every place that lists or checks the
names (the run config, the launchers' ``--help``, the node policy) sees it. A name
no entry has fails with a :class:`ConfigError` naming the run key and the names
registered, as :mod:`common.config` words its own errors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


class UnknownName(ConfigError):
    """A run-config value that no registry entry has."""


class Registry(Generic[T]):
    """The entries one run-config key can name, in registration order."""

    def __init__(self, key: str, entries: Mapping[str, T] | None = None) -> None:
        self.key = key  # the run-config key (dashes) whose values these are
        self._entries: dict[str, T] = {}
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, name: str) -> T:
        """The entry for ``name``; :class:`UnknownName` naming the key if none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def unknown(self, name: object) -> UnknownName:
        """The error for a value of this key that is not registered."""
        return UnknownName(
            f"run config key '{self.key}': must be one of "
            f"{', '.join(map(repr, self._entries))}, got {name!r}"
        )

    def register(self, name: str, entry: T, *, replace: bool = False) -> None:
        """Make ``name`` selectable; an existing name needs ``replace=True``."""
        if not isinstance(name, str) or not name or name != name.strip().lower():
            raise ValueError(f"a '{self.key}' name must be lower-case text, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"'{self.key}' {name!r} is already registered")
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a test's registration, say); unknown: :class:`UnknownName`."""
        self.get(name)
        del self._entries[name]
