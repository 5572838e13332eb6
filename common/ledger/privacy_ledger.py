"""A client's privacy ledger: its whole DP-SGD history and the cumulative ε.

The ledger is the Opacus accountant history ``[(σ, q, steps), ...]`` plus the
accountant name, δ and the server rounds it trained in. It persists as plain
JSON, so it survives in ``context.state`` and on disk, and anyone can recompute
ε from it with Opacus alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.privacy.accountants.registry import ACCOUNTANTS, get_accountant

# The opacus package is imported only for PRV (see common.privacy.accountants.opacus_rdp).
if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

LEDGER_FORMAT = "privfed-ledger/1"
MIN_SIGMA, MAX_SIGMA = 0.01, 1e6
MAX_STEPS = 10**12  # per entry: far beyond any real history, small enough to account
MAX_ENTRIES = 100_000
MAX_JSON_CHARS = 8_000_000


class LedgerError(ValueError):
    """A stored ledger is unreadable or inconsistent."""


@dataclass(frozen=True)
class LedgerEntry:
    """``steps`` DP-SGD steps at noise multiplier σ and Poisson sample rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma = self.noise_multiplier
        # σ = 0 records a non-private release; a positive σ below MIN_SIGMA gives an
        # astronomically large ε that the accountants cannot even compute.
        if not (sigma == 0 or MIN_SIGMA <= sigma <= MAX_SIGMA):
            raise LedgerError(
                f"noise multiplier must be 0 or in [{MIN_SIGMA}, {MAX_SIGMA:g}], "
                f"got {sigma}"
            )
        if not 0 < self.sample_rate <= 1:
            raise LedgerError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise LedgerError(
                f"steps must be an integer in [1, {MAX_STEPS:g}], got {self.steps!r}"
            )

    def as_tuple(self) -> tuple[float, float, int]:
        """The Opacus history form ``(σ, q, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def make_accountant(accountant: str) -> IAccountant:
    """A fresh Opacus accountant by short name (``rdp``, ``prv``: the registry's)."""
    return get_accountant(accountant).make()


def epsilon_of_history(
    history: list[tuple[float, float, int]], delta: float, accountant: str
) -> float:
    """Cumulative ε of an Opacus history; 0 for an empty one.

    Equal to Opacus' ``RDPAccountant``/``PRVAccountant.get_epsilon`` on the same
    history; each accountant module caches what it can (per-step RDP vectors, whole
    PRV histories), so reporting ε every round stays cheap.
    """
    if not history:
        return 0.0
    if any(float(sigma) == 0 for sigma, _, _ in history):
        return math.inf  # a non-private release: no finite ε covers it
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return get_accountant(accountant).epsilon(key, delta)


def _whole(value: Any) -> int:
    """A stored step count: an integer, never a rounded float or a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"steps must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class BudgetCheck:
    """What one more round would cost, and whether the budget allows it."""

    epsilon_before: float
    epsilon_after: float
    budget: float

    @property
    def allowed(self) -> bool:
        """True when the round keeps cumulative ε within the budget."""
        return self.epsilon_after <= self.budget


@dataclass(frozen=True)
class PrivacyLedger:
    """Everything one client has spent, across every round it trained in."""

    accountant: str
    delta: float
    entries: tuple[LedgerEntry, ...] = ()
    rounds: tuple[int, ...] = field(default=())
    runs: tuple[int, ...] = field(default=())  # Flower run id of each recorded round

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise LedgerError(
                f"unknown accountant {self.accountant!r}; allowed: "
                f"{', '.join(map(repr, ACCOUNTANTS))}"
            )
        if not 0 < self.delta < 1:
            raise LedgerError(f"delta must be in (0, 1), got {self.delta}")
        if not self.runs and self.rounds:
            object.__setattr__(self, "runs", (0,) * len(self.rounds))
        if len(self.runs) != len(self.rounds):
            raise LedgerError("ledger 'runs' and 'rounds' differ in length")
        if len(self.entries) > MAX_ENTRIES:
            raise LedgerError(f"ledger has more than {MAX_ENTRIES} entries")

    def with_accountant(self, accountant: str) -> PrivacyLedger:
        """The same history, reported under another accountant, at the same δ.

        The history is mechanism-level (σ, q, steps), so any accountant can report
        it; δ is fixed when the ledger is created and never changes, so a run cannot
        lower a ledger's ε by asking for a larger δ.
        """
        return PrivacyLedger(accountant, self.delta, self.entries, self.rounds, self.runs)

    @property
    def accountant_name(self) -> str:
        """The accountant's full name, printed beside every ε."""
        return get_accountant(self.accountant).NAME

    @property
    def total_steps(self) -> int:
        """DP-SGD steps over the whole ledger."""
        return sum(e.steps for e in self.entries)

    @property
    def noise_multiplier(self) -> float | None:
        """σ of the latest entry, or ``None`` for an empty ledger."""
        return self.entries[-1].noise_multiplier if self.entries else None

    def history(self) -> list[tuple[float, float, int]]:
        """The Opacus accountant history."""
        return [e.as_tuple() for e in self.entries]

    def extended(
        self,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        run_id: int = 0,
    ) -> PrivacyLedger:
        """A new ledger with one more round; equal (σ, q) merge as in Opacus."""
        if self.rounds and run_id == self.runs[-1] and server_round <= self.rounds[-1]:
            raise LedgerError(
                f"round {server_round} of run {run_id} is not after the last recorded "
                f"round {self.rounds[-1]}"
            )
        new = LedgerEntry(float(noise_multiplier), float(sample_rate), int(steps))
        entries = list(self.entries)
        if entries and (entries[-1].noise_multiplier, entries[-1].sample_rate) == (
            new.noise_multiplier,
            new.sample_rate,
        ):
            last = entries.pop()
            new = LedgerEntry(last.noise_multiplier, last.sample_rate, last.steps + steps)
        entries.append(new)
        return PrivacyLedger(
            self.accountant,
            self.delta,
            tuple(entries),
            (*self.rounds, server_round),
            (*self.runs, run_id),
        )

    def extended_non_private(self, server_round: int, run_id: int = 0) -> PrivacyLedger:
        """A round without DP (allowed by the node's policy): ε is infinite from now on.

        Recorded as σ = 0 so that the release is never forgotten: every later
        budget check sees ε = ∞ and refuses.
        """
        return self.extended(server_round, 0.0, 1.0, 1, run_id)

    @property
    def released_without_dp(self) -> bool:
        """True once a non-private round was recorded."""
        return any(e.noise_multiplier == 0 for e in self.entries)

    def epsilon(self) -> float:
        """Cumulative ε over every recorded step (∞ after a non-private round)."""
        return epsilon_of_history(self.history(), self.delta, self.accountant)

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Cumulative ε if one more round of ``steps`` steps were taken."""
        probe = self.extended(
            (self.rounds[-1] + 1) if self.rounds else 1,
            noise_multiplier,
            sample_rate,
            steps,
            self.runs[-1] if self.runs else 0,
        )
        return probe.epsilon()

    def check_round(
        self, noise_multiplier: float, sample_rate: float, steps: int, budget: float
    ) -> BudgetCheck:
        """ε now and after one more round of ``steps`` steps, against ``budget``."""
        return BudgetCheck(
            self.epsilon(), self.epsilon_after(noise_multiplier, sample_rate, steps), budget
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-safe)."""
        return {
            "format": LEDGER_FORMAT,
            "accountant": self.accountant,
            "delta": self.delta,
            "history": [list(e.as_tuple()) for e in self.entries],
            "rounds": list(self.rounds),
            "runs": list(self.runs),
        }

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> PrivacyLedger:
        """Parse :meth:`to_dict` output; anything malformed raises LedgerError."""
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"not a {LEDGER_FORMAT} ledger")
        try:
            entries = tuple(
                LedgerEntry(float(s), float(q), _whole(n)) for s, q, n in data["history"]
            )
            rounds = tuple(int(r) for r in data["rounds"])
            runs = tuple(int(r) for r in data.get("runs", [0] * len(rounds)))
            return cls(str(data["accountant"]), float(data["delta"]), entries, rounds, runs)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LedgerError):
                raise
            raise LedgerError(f"malformed ledger: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Parse :meth:`to_json` output."""
        if len(text) > MAX_JSON_CHARS:
            raise LedgerError(f"ledger JSON is longer than {MAX_JSON_CHARS} characters")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise LedgerError(f"ledger is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
