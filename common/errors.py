"""The error every bad run-config value raises, in a module of its own.

The registries (:mod:`common.registry`) raise it for an unknown name, and
:mod:`common.config` builds its choice lists from them: keeping the class here lets
both import it without importing each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A run-config key has a value outside what is allowed."""
