"""How a round or a summary states its ε, in words.

The ServerApp's progress lines and summary and the launcher's summary of a run it
had to stop all say it the same way; the launcher imports this without the round
loop (and torch) behind it.
"""

from __future__ import annotations

from typing import Any


def epsilon_text(record: dict[str, Any]) -> str:
    """How a round or summary states ε: cumulative, accountant, δ, privacy unit."""
    if record.get("privacy_mode") == "none":
        return "non-private (no ε)"
    eps = record["max_epsilon"]
    if record.get("privacy_unit") == "client":
        return (
            f"cumulative client-level ε {eps:.3f} ({record['accountant']}, "
            f"δ={record['delta']:g}, per client)"
        )
    hidden = record.get("nodes_keeping_ledger_private") or 0
    kept = f"; {hidden} node(s) keep their ledger on the device" if hidden else ""
    if record.get("max_epsilon_infinite"):
        return f"max cumulative ε ∞ (a node's ledger records a release without DP){kept}"
    if eps is None:
        return f"no ledger released to the server{kept}"
    return (
        f"max cumulative ε {eps:.3f} ({record['accountant']}, δ={record['delta']:g}, "
        f"per record){kept}"
    )
