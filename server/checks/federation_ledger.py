"""The client-level privacy history of a federation, kept by the server.

Central DP-FedAvg (:class:`FederationLedger`): one entry per round, (z, q, 1), the
Poisson-subsampled Gaussian mechanism of that round, with the cohort's noise
multiplier z (the update's and the clipped count's noise composed) and the client
sampling rate q. ε is Opacus' RDP (or PRV) accountant on that history at the run's
δ; tests check it against Google's dp-accounting.

Distributed DP under secure aggregation (:class:`DistributedLedger`): one entry per
unmasked round, the Skellam release (noise variance of the uploads that were
summed, sensitivities, q) with the round's protocol facts; ε from
:mod:`common.secure_aggregation.skellam_accounting`.

Either file is rewritten atomically after every round, before the round's model is
published, so a crash never leaves a model whose privacy cost is not on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write_bytes
from common.ledger.privacy_ledger import BudgetCheck, PrivacyLedger
from common.secure_aggregation.skellam_accounting import (
    ACCOUNTANT_NAME,
    SkellamRound,
    composed_epsilon,
)

LEDGER_FILE = "federation-ledger.json"


class FederationLedger:
    """The (z, q, rounds) history of the run, its ε, and its file in the results."""

    def __init__(
        self, out_dir: Path, accountant: str, delta: float, budget: float, run_id: int
    ) -> None:
        self.path = out_dir / LEDGER_FILE
        self.ledger = PrivacyLedger(accountant, delta)
        self.budget = budget
        self.run_id = run_id
        self.facts: dict[str, Any] = {}

    def epsilon(self) -> float:
        """Cumulative client-level ε so far."""
        return self.ledger.epsilon()

    @property
    def accountant_name(self) -> str:
        """The accountant every ε of this ledger is computed with."""
        return self.ledger.accountant_name

    @property
    def history(self) -> list[Any]:
        """The recorded mechanism of every round, as plain data."""
        return self.ledger.history()

    @property
    def rounds_recorded(self) -> int:
        """Rounds in the ledger."""
        return len(self.ledger.rounds)

    def check(self, noise_multiplier: float, sampling_rate: float) -> BudgetCheck:
        """The ε one more round of (z, q) would bring, against the budget."""
        return self.ledger.check_round(noise_multiplier, sampling_rate, 1, self.budget)

    def record_round(
        self,
        server_round: int,
        noise_multiplier: float,
        sampling_rate: float,
        facts: dict[str, Any],
    ) -> None:
        """Add one round and write the file (atomically) before anything is published."""
        self.ledger = self.ledger.extended(
            server_round, noise_multiplier, sampling_rate, 1, self.run_id
        )
        self.facts = dict(facts)
        _write(self.path, self.to_dict())

    def restore(self, at_checkpoint: dict[str, Any]) -> int:
        """Continue from the file, which must extend the checkpoint's copy of the
        ledger; returns how many rounds the file holds beyond it.

        The file is written before the checkpoint, so it may hold one more round (the
        round in flight when the server died): that release is kept. A file behind
        the checkpoint was rolled back (:class:`ValueError`).
        """
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            on_disk = PrivacyLedger.from_dict(data["ledger"])
            saved = PrivacyLedger.from_dict(at_checkpoint)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"federation ledger {self.path} is unreadable: {exc}") from exc
        pairs = list(zip(on_disk.rounds, on_disk.runs, strict=True))
        kept = list(zip(saved.rounds, saved.runs, strict=True))
        if pairs[: len(kept)] != kept:
            raise ValueError(
                f"{LEDGER_FILE} ({len(pairs)} rounds) does not extend the ledger in the "
                f"checkpoint ({len(kept)} rounds): it was rolled back or replaced; "
                "refusing to resume with less privacy spent than was released"
            )
        self.ledger = on_disk.with_accountant(self.ledger.accountant)
        return len(pairs) - len(kept)

    def to_dict(self) -> dict[str, Any]:
        """The file's content: the ledger, its ε, and the mechanism's facts."""
        eps = self.epsilon()
        return {
            "privacy_unit": "client",
            "accountant": self.ledger.accountant_name,
            "delta": self.ledger.delta,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_budget": self.budget if math.isfinite(self.budget) else None,
            "ledger": self.ledger.to_dict(),
            **self.facts,
        }


def _write(path: Path, content: dict[str, Any]) -> None:
    text = json.dumps(content, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


class DistributedLedger:
    """The Skellam releases of a secure-aggregation run, their ε, and the file."""

    def __init__(self, out_dir: Path, delta: float, budget: float, run_id: int) -> None:
        self.path = out_dir / LEDGER_FILE
        self.delta = delta
        self.budget = budget
        self.run_id = run_id
        self.releases: list[SkellamRound] = []
        self.rounds: list[dict[str, Any]] = []  # per round: release, ε, protocol facts
        self.facts: dict[str, Any] = {}

    accountant_name = ACCOUNTANT_NAME

    def epsilon(self, extra: SkellamRound | None = None) -> float:
        """Cumulative client-level ε (with one more release ``extra``, if given)."""
        releases = self.releases + ([extra] if extra is not None else [])
        return composed_epsilon(releases, self.delta)

    def check_release(self, release: SkellamRound) -> BudgetCheck:
        """The ε one more ``release`` would bring, against the budget."""
        return BudgetCheck(self.epsilon(), self.epsilon(release), self.budget)

    @property
    def history(self) -> list[Any]:
        """[variance, Δ₁, Δ₂, q] of every recorded round (integer domain)."""
        return [
            [r.variance, r.l1_sensitivity, r.l2_sensitivity, r.sampling_rate]
            for r in self.releases
        ]

    @property
    def rounds_recorded(self) -> int:
        """Rounds in the ledger."""
        return len(self.releases)

    def record_round(
        self,
        server_round: int,
        release: SkellamRound,
        round_facts: dict[str, Any],
        facts: dict[str, Any],
    ) -> float:
        """Add one unmasked round and write the file before anything is published;
        returns the cumulative ε."""
        self.releases.append(release)
        epsilon = self.epsilon()
        self.rounds.append(
            {
                "round": server_round,
                "run_id": self.run_id,
                **release.to_dict(),
                "epsilon": epsilon,
                "epsilon_round_alone": composed_epsilon([release], self.delta),
                **round_facts,
            }
        )
        self.facts = dict(facts)
        _write(self.path, self.to_dict())
        return epsilon

    def restore(self, at_checkpoint: dict[str, Any]) -> list[SkellamRound]:
        """Continue from the file, which must extend the checkpoint's copy; returns
        the releases the file holds beyond the checkpoint (the round in flight)."""
        try:
            on_disk = json.loads(self.path.read_text(encoding="utf-8"))["rounds"]
            saved = at_checkpoint["rounds"]
            releases = [SkellamRound.from_dict(r) for r in on_disk]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"federation ledger {self.path} is unreadable: {exc}") from exc
        ids = [(r["round"], r["run_id"]) for r in on_disk]
        if ids[: len(saved)] != [(r["round"], r["run_id"]) for r in saved]:
            raise ValueError(
                f"{self.path.name} does not extend the checkpoint's ledger "
                f"({len(on_disk)} rounds on disk, {len(saved)} in the checkpoint)"
            )
        self.releases, self.rounds = releases, list(on_disk)
        return releases[len(saved) :]

    def to_dict(self) -> dict[str, Any]:
        """The file's content: every round's release and ε, and the run's facts."""
        eps = self.epsilon()
        return {
            "privacy_unit": "client",
            "mechanism": "distributed Skellam under secure aggregation",
            "accountant": self.accountant_name,
            "delta": self.delta,
            "epsilon": eps if math.isfinite(eps) else None,
            "epsilon_budget": self.budget if math.isfinite(self.budget) else None,
            "rounds": self.rounds,
            **self.facts,
        }
