"""Show a node's privacy ledger: cumulative ε, δ, accountant, rounds and steps.

python -m client.show_ledger /var/lib/privfed            # a node's state-dir
python -m client.show_ledger STATE_DIR --accountant prv --json

ε is always reported at the δ the ledger was created with (the node's policy δ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from client.privacy.ledger_store import ledger_path, read_ledger_file
from client.privacy.policy import POLICY_FILE, PolicyError, PrivacyPolicy
from common.ledger.privacy_ledger import LedgerError
from common.privacy.accountants.registry import accountant_names


def main(argv: list[str] | None = None) -> int:
    """Print the ledger; exit 1 if it is missing or unreadable."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state_dir", help="the node's state-dir")
    parser.add_argument(
        "--accountant", choices=accountant_names(), help="default: as stored"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    path = ledger_path(args.state_dir)
    if not path.exists():
        print(f"no privacy ledger at {path} (this node has not trained)", file=sys.stderr)
        return 1
    try:
        ledger = read_ledger_file(path)
        ledger = ledger.with_accountant(args.accountant or ledger.accountant)
        epsilon = ledger.epsilon()
    except (LedgerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    policy_path = Path(args.state_dir).expanduser() / POLICY_FILE
    try:
        policy = PrivacyPolicy.from_file(policy_path).to_mapping()
    except PolicyError as exc:
        policy = {"error": str(exc)}
    report = {
        "ledger": str(path),
        "policy": policy,
        "epsilon": epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant_name,
        "rounds_trained": len(ledger.rounds),
        "runs": sorted(set(ledger.runs)),
        "steps_total": ledger.total_steps,
        "history": [list(e.as_tuple()) for e in ledger.entries],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"ledger        {path}")
        print(
            f"cumulative ε  {epsilon:.4f}  ({ledger.accountant_name}, δ={ledger.delta:g})"
        )
        print(f"rounds        {len(ledger.rounds)} in {len(set(ledger.runs))} run(s)")
        print(f"steps         {ledger.total_steps}")
        if "error" in policy:
            print(f"policy        {policy['error']}")
        else:
            print(
                f"policy        {policy_path}: budget ε {policy['epsilon-budget']:g} at "
                f"δ={policy['delta']:g}, {policy['accountant']}"
            )
        for sigma, rate, steps in report["history"]:
            print(f"  σ={sigma:.4f}  q={rate:.5f}  steps={steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
