"""Keep the client's privacy ledger in ``context.state`` between rounds."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context

from common.config import RunConfig
from common.privacy_ledger import PrivacyLedger

STATE_KEY = "privfed-ledger"


def load_ledger(context: Context, cfg: RunConfig) -> PrivacyLedger:
    """The stored ledger, or an empty one for a client that has not trained yet.

    ε is reported under this run's accountant and δ, over the whole history.
    """
    if STATE_KEY not in context.state.config_records:
        return PrivacyLedger(cfg.accountant, cfg.delta)
    ledger = PrivacyLedger.from_json(str(context.state.config_records[STATE_KEY]["json"]))
    return ledger.with_accounting(cfg.accountant, cfg.delta)


def store_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Write the ledger into ``context.state``."""
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": ledger.to_json()})
