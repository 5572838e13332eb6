"""Record keys and status values that client replies and the server agree on."""

from __future__ import annotations

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
PRIVACY_KEY = "privacy"  # ConfigRecord: status, accountant, ledger JSON

STATUS_TRAINED = "trained"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_LEDGER_ERROR = "ledger-error"  # the ledger could not be read: fail closed
STATUS_ERROR = "error"

# Accountant label of a non-private client (no ε exists).
NO_ACCOUNTANT = "none"
