"""The privacy modes a run can be in, each a frozen description registered by name.

A mode says what one ε protects (its unit), how ``summary.json`` describes the
guarantee, and where the noise comes from. ``sample`` (record-level DP-SGD on each
client), ``client`` (DP-FedAvg, the server adds the noise) and ``none`` are the
values of run key ``privacy-mode``; ``secure-aggregation`` is a *variant* of
``client``, selected by the bool key of the same name (each client adds its share
of the noise, the server unmasks only the sum). The server maps every mode, variant
included, to the strategy that runs it (``server/strategies/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.registry import Registry

UNITS = ("record", "client", None)  # what one ε protects; None: no DP


class _ModeKeys(Protocol):
    """What picks a mode: a RunConfig (not imported here: it imports this module)."""

    @property
    def privacy_mode(self) -> str:
        """The run key ``privacy-mode``; a variant's bool key is read by name."""
        ...


@dataclass(frozen=True)
class PrivacyMode:
    """One privacy mode: its unit of privacy, its description and its noise."""

    name: str
    unit: str | None
    description: str  # summary.json's "privacy_model"
    noise: str  # where the noise comes from (summary.json "noise", the log)
    reproducible_noise: str | None = None  # the same with reproducible-noise = true
    variant_of: str | None = None  # the privacy-mode value this mode refines
    enabled_by: str | None = None  # the bool run-config key that selects the variant

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"privacy mode {self.name!r}: unit must be one of {UNITS}")
        if (self.variant_of is None) != (self.enabled_by is None):
            raise ValueError(
                f"privacy mode {self.name!r}: a variant needs both variant_of and "
                "enabled_by (the bool run key that selects it)"
            )
        if not self.description or not self.noise:
            raise ValueError(f"privacy mode {self.name!r}: describe it and its noise")

    def noise_statement(self, reproducible: bool) -> str:
        """Where the DP noise comes from, as the results and the log state it."""
        if reproducible and self.reproducible_noise is not None:
            return self.reproducible_noise
        return self.noise


_CLIENT_NOISE = "client-level: the server adds the noise to the sum of clipped updates "

_BUILT_IN = (
    PrivacyMode(
        "sample",
        "record",
        "sample-level (record-level) DP per client, cumulative over all rounds",
        "fresh OS entropy per client and round: not reproducible, not replayable",
        "noise reproducible from the seed: not private against the server",
    ),
    PrivacyMode(
        "client",
        "client",
        "client-level DP-FedAvg (the server adds the noise), cumulative over all rounds",
        _CLIENT_NOISE + "from fresh OS entropy each round",
        _CLIENT_NOISE
        + "from a generator seeded from the run seed (reproducible; not private)",
    ),
    PrivacyMode(
        "none", None, "none (non-private reference)", "no DP noise (non-private run)"
    ),
    PrivacyMode(
        "secure-aggregation",
        "client",
        "client-level distributed DP: each client adds its share of Skellam noise and "
        "the server unmasks only the sum (secure aggregation), cumulative over all "
        "rounds",
        "client-level, distributed: each client adds its share of Skellam noise from "
        "fresh OS entropy before secure aggregation masks its update",
        variant_of="client",
        enabled_by="secure-aggregation",
    ),
)
PRIVACY_MODES: Registry[PrivacyMode] = Registry(
    "privacy-mode", {mode.name: mode for mode in _BUILT_IN}
)


def privacy_mode_names() -> tuple[str, ...]:
    """The values of run key ``privacy-mode`` (variants are chosen by their own key)."""
    return tuple(n for n in PRIVACY_MODES if PRIVACY_MODES.get(n).variant_of is None)


def register_privacy_mode(mode: PrivacyMode, *, replace: bool = False) -> None:
    """Make ``mode`` selectable (a variant: through its ``enabled_by`` key)."""
    if mode.variant_of is not None and mode.variant_of not in privacy_mode_names():
        raise PRIVACY_MODES.unknown(mode.variant_of)
    PRIVACY_MODES.register(mode.name, mode, replace=replace)


def mode_of(cfg: _ModeKeys) -> PrivacyMode:
    """The run's mode: its ``privacy-mode``, or a variant of it whose key is true."""
    base = PRIVACY_MODES.get(cfg.privacy_mode)
    for name in PRIVACY_MODES:
        mode = PRIVACY_MODES.get(name)
        if mode.variant_of == base.name and getattr(
            cfg, str(mode.enabled_by).replace("-", "_"), False
        ):
            return mode
    return base
