"""The client-level privacy history of a federation, kept by the server that adds the noise.

One entry per round: (z, q, 1), the Poisson-subsampled Gaussian mechanism of that
round, with the cohort's noise multiplier z (the update's and the clipped count's
noise composed) and the client sampling rate q. ε is Opacus' RDP (or PRV)
accountant on that history at the run's δ; tests check it against Google's
dp-accounting. The file is rewritten atomically after every round, before the
round's model is published, so a crash never leaves a model whose privacy cost is
not on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.atomic_files import atomic_write_bytes
from common.privacy_ledger import BudgetCheck, PrivacyLedger

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
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(self.path, text.encode())

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
