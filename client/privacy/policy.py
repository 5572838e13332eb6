"""The node's privacy policy: what its owner allows, whatever a run config asks.

A deployed node (one with a ``state-dir``) reads ``<state-dir>/privacy-policy.toml``,
written by the device's owner; the server cannot change it. In a simulation (no
``state-dir``) one person holds all the data, so the run config is the policy.

A run that asks for anything weaker than the policy (non-private training, a larger
δ, a larger ε budget, less noise, reproducible noise, local evaluation metrics) is
refused with a reason, before anything trains.

A device plans DP-SGD (q, steps, σ, the noise divisor and the δ < 1/N refusal) from
its public ``planning-records``, never from its exact record count: every plan made
from N changes with one record, so the server would detect any one record with
certainty whatever ε the ledger says. A device without the key refuses record-level
runs, naming it. A simulation plans from N: partition sizes are public there.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.ledger.privacy_ledger import PrivacyLedger
from common.privacy.accountants.registry import accountant_names
from common.privacy.round_decision import delta_allows_record_release

POLICY_FILE = "privacy-policy.toml"

# Policy key -> (type, meaning). Required keys have no default in PrivacyPolicy.
POLICY_KEYS: dict[str, tuple[type, str]] = {
    "epsilon-budget": (
        float,
        "lifetime cap on cumulative ε over all runs (> 0; inf = none)",
    ),
    "delta": (float, "δ the ledger accounts at, fixed when the ledger is created (0, 1)"),
    "min-noise-multiplier": (float, "least σ this node trains with (>= 0; default 0)"),
    "allow-non-private": (bool, "train without DP when a run asks (default false)"),
    "allow-client-level": (
        bool,
        "send clipped, un-noised updates to a server that adds client-level noise "
        "(privacy-mode = 'client'; default false)",
    ),
    "allow-secure-aggregation": (
        bool,
        "send masked updates carrying this node's share of the client-level noise, "
        "which the server can only unmask summed with others' (privacy-mode = "
        "'client', secure-aggregation = true; default false)",
    ),
    "federated-evaluation": (bool, "send local test metrics, un-noised (default false)"),
    "release-ledger": (bool, "send the ledger (σ, q, steps history) (default false)"),
    "release-timing": (bool, "send the round's compute seconds (default false)"),
    "allow-reproducible-noise": (bool, "accept reproducible-noise = true (default false)"),
    "accountant": (str, "'rdp' or 'prv': the accountant the budget is checked with"),
    "planning-records": (
        int,
        "public record count q, steps, σ and the δ check are planned from (required "
        "for privacy-mode = 'sample' on a device)",
    ),
}
# A device answers federated evaluation only on at least this many test records.
MIN_TEST_RECORDS = 50


class PolicyError(ValueError):
    """The policy file is missing, unreadable, or has a bad key or value."""


_MISSING_PLANNING_RECORDS = (
    "run config key 'privacy-mode' 'sample' plans DP-SGD (q, steps, σ) from a record "
    "count; this node's privacy policy ({source}) lacks the key 'planning-records', "
    "the public count it plans from (a plan from the exact count would reveal one "
    "record; see docs/edge-clients.md, 'Planning records')"
)


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the node's owner allows; ``source`` says where it was read from."""

    epsilon_budget: float
    delta: float
    min_noise_multiplier: float = 0.0
    allow_non_private: bool = False
    allow_client_level: bool = False
    allow_secure_aggregation: bool = False
    federated_evaluation: bool = False
    release_ledger: bool = False
    release_timing: bool = False
    allow_reproducible_noise: bool = False
    accountant: str = "rdp"
    planning_records: int | None = None
    exact_records: bool = False  # plan from the real N (simulation only; not a key)
    source: str = "run config (simulation: one owner holds all data)"

    def __post_init__(self) -> None:
        if not (self.epsilon_budget > 0 and not math.isnan(self.epsilon_budget)):
            self._fail(
                "epsilon-budget", "a number > 0 (inf for no cap)", self.epsilon_budget
            )
        if not 0 < self.delta < 1:
            self._fail("delta", "a number in (0, 1)", self.delta)
        if not (0 <= self.min_noise_multiplier < math.inf):
            self._fail(
                "min-noise-multiplier", "a finite number >= 0", self.min_noise_multiplier
            )
        if self.accountant not in accountant_names():
            allowed = " or ".join(map(repr, accountant_names()))
            self._fail("accountant", allowed, self.accountant)
        if self.planning_records is not None and not 1 <= self.planning_records < 2**40:
            self._fail("planning-records", "an integer >= 1", self.planning_records)

    def _fail(self, key: str, allowed: str, value: object) -> None:
        raise PolicyError(f"privacy policy ({self.source}) key '{key}': must be {allowed}, "
                          f"got {value!r}")  # fmt: skip

    @classmethod
    def for_simulation(cls, cfg: RunConfig) -> PrivacyPolicy:
        """The run config as policy: the simulation's owner holds every shard."""
        return cls(
            epsilon_budget=cfg.effective_epsilon_budget,
            delta=cfg.delta,
            allow_non_private=cfg.privacy_mode == "none",
            allow_client_level=cfg.is_client_level and not cfg.secure_aggregation,
            allow_secure_aggregation=cfg.is_client_level and cfg.secure_aggregation,
            federated_evaluation=cfg.fraction_evaluate > 0,
            release_ledger=True,
            release_timing=True,
            allow_reproducible_noise=True,
            accountant=cfg.accountant,
            exact_records=True,
        )

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str) -> PrivacyPolicy:
        """Parse policy keys (dashes), checking every key's type."""
        unknown = sorted(set(data) - set(POLICY_KEYS))
        if unknown:
            raise PolicyError(
                f"privacy policy ({source}): unknown key(s) "
                f"{', '.join(map(repr, unknown))}; allowed: {', '.join(POLICY_KEYS)}"
            )
        for key in ("epsilon-budget", "delta"):
            if key not in data:
                raise PolicyError(
                    f"privacy policy ({source}) lacks the required key '{key}'"
                )
        kwargs: dict[str, Any] = {"source": source}
        for key, value in data.items():
            kind, meaning = POLICY_KEYS[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (
                kind is not bool and isinstance(value, bool)
            ):
                raise PolicyError(
                    f"privacy policy ({source}) key '{key}': must be a {kind.__name__} "
                    f"({meaning}), got {value!r}"
                )
            kwargs[key.replace("-", "_")] = value
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> PrivacyPolicy:
        """Read ``privacy-policy.toml``; a missing or bad file raises PolicyError."""
        # Messages name the file, not its folder: a reason goes to the server, and a
        # path can tell it user names and layout the owner never chose to release.
        name = f"{path.name} in the node's state-dir"
        if not path.is_file():
            raise PolicyError(
                f"no privacy policy ({name}): the device's owner writes it (required "
                "keys 'epsilon-budget' and 'delta'; see docs/privacy-model.md, "
                "'Privacy policy')"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"privacy policy ({name}) is unreadable: {exc}") from None
        return cls.from_mapping(data, name)

    def to_mapping(self) -> dict[str, Any]:
        """The policy as file keys (what :meth:`from_mapping` reads)."""
        values = {key: getattr(self, key.replace("-", "_")) for key in POLICY_KEYS}
        return {key: value for key, value in values.items() if value is not None}

    def records_for_planning(self, num_records: int) -> int:
        """The record count q, steps, σ, the noise divisor and the δ check use.

        Any plan made from the real N leaks it, bucketed or not: at a bucket's edge
        one record flips q, the steps, σ and the update's noise scale. A device
        plans from its public ``planning-records`` only (``refusal_for_run`` refuses
        a private run without it); a simulation plans from N, which is public there
        (one owner holds every shard).
        """
        if self.planning_records is not None:
            return self.planning_records
        if self.exact_records:
            return num_records
        raise PolicyError(_MISSING_PLANNING_RECORDS.format(source=self.source))

    # -- checks -------------------------------------------------------------------
    def refusal_for_run(self, cfg: RunConfig) -> str | None:
        """Why this node refuses ``cfg`` before looking at its data, or ``None``."""
        if cfg.is_client_level and cfg.secure_aggregation:
            if not self.allow_secure_aggregation:
                return self._refuse(
                    "secure-aggregation",
                    "true sends a masked update with this node's share of the noise",
                    "allow-secure-aggregation = false",
                )
        elif cfg.is_client_level and not self.allow_client_level:
            return self._refuse(
                "privacy-mode",
                "'client' sends the clipped update without noise (the server adds "
                "the client-level noise)",
                "allow-client-level = false",
            )
        if cfg.privacy_mode == "none":
            if self.allow_non_private:
                return None
            return self._refuse(
                "privacy-mode",
                "'none' asks for non-private training",
                "allow-non-private = false",
            )
        # Replayable noise is refused alike: the node's (sample) or the server's (client).
        if cfg.reproducible_noise and not self.allow_reproducible_noise:
            return self._refuse(
                "reproducible-noise",
                "true makes the noise replayable from the seed",
                "allow-reproducible-noise = false",
            )
        if cfg.is_client_level:
            return None  # the rest are record-level limits; the server accounts this ε
        if cfg.accountant != self.accountant:
            return self._refuse(
                "accountant",
                f"'{cfg.accountant}' would measure this node's budget",
                f"accountant = '{self.accountant}'",
            )
        if cfg.delta > self.delta:
            return self._refuse(
                "delta",
                f"{cfg.delta:g} is larger than this node's δ",
                f"delta = {self.delta:g}",
            )
        if cfg.effective_epsilon_budget > self.epsilon_budget:
            asked = cfg.effective_epsilon_budget
            return self._refuse(
                "epsilon-budget",
                f"allows cumulative ε up to {asked:g}"
                if math.isfinite(asked)
                else "sets no ε cap (with target-epsilon also 0)",
                f"epsilon-budget = {self.epsilon_budget:g}",
            )
        if cfg.noise_multiplier > 0 and cfg.noise_multiplier < self.min_noise_multiplier:
            return self._refuse(
                "noise-multiplier",
                f"{cfg.noise_multiplier:g} is below this node's least σ",
                f"min-noise-multiplier = {self.min_noise_multiplier:g}",
            )
        if self.planning_records is None and not self.exact_records:
            return _MISSING_PLANNING_RECORDS.format(source=self.source)
        return None

    def refusal_for_round(
        self,
        noise_multiplier: float,
        planning_records: int,
        ledger: PrivacyLedger,
        num_records: int,
    ) -> tuple[str, str] | None:
        """(reason sent, detail logged locally) to refuse this round, or ``None``.

        Every threshold is checked on public numbers: σ (planned from the public
        count) and δ against 1/``planning_records``, never the node's exact N, so
        that no refusal flips on one record. ``num_records`` only enters the log.
        """
        if noise_multiplier < self.min_noise_multiplier:
            reason = self._refuse(
                "target-epsilon",
                f"gives σ = {noise_multiplier:.4g} (planned from the public record "
                "count), below this node's least σ",
                f"min-noise-multiplier = {self.min_noise_multiplier:g}",
            )
            return reason, reason
        if ledger.delta != self.delta:
            reason = (
                f"this node's ledger accounts at δ = {ledger.delta:g} and keeps it "
                f"forever; its policy ({self.source}) says delta = {self.delta:g}"
            )
            return reason, reason
        if delta_allows_record_release(self.delta, planning_records):
            detail = (
                f"δ = {self.delta:g} is not below 1/N = 1/{planning_records} for the "
                f"N = {planning_records} records this node plans from (it holds "
                f"{num_records}); a δ that large allows releasing a whole record"
            )
            reason = (
                f"δ = {self.delta:g} is not below 1/N for the record count this node "
                "plans from (the count stays on the node; see its log)"
            )
            return reason, detail
        return None

    def _refuse(self, run_key: str, asked: str, policy_says: str) -> str:
        return (
            f"run config key '{run_key}' {asked}; this node's privacy policy "
            f"({self.source}) says {policy_says}"
        )


def load_policy(cfg: RunConfig, state_dir: str | None) -> PrivacyPolicy:
    """The device policy of a deployed node, or the run config in a simulation."""
    if state_dir is None:
        return PrivacyPolicy.for_simulation(cfg)
    return PrivacyPolicy.from_file(Path(state_dir).expanduser() / POLICY_FILE)
