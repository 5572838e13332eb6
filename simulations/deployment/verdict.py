"""The soak's verdict: did the run finish, and is every node's budget exact?

Read from what the run left: ``rounds.jsonl`` (what the server accepted, from
whom, and who dropped out), each node's privacy ledger on its own disk, and
``faults.jsonl`` (what the harness did, and when).

The rule for a node's ledger (``LEDGER_RULE``): a node stores the extended
ledger *before* its update leaves (docs/privacy-model.md), so

* **lost**: a round whose update the server accepted but which the node's
  ledger lacks. Must be none: that budget was spent and not counted.
* **double-counted**: a (Flower run, round) the ledger holds twice. Must be none.
* **charged, not delivered**: a round in the ledger whose update the server
  never accepted (the node dropped out after training: killed, frozen or cut
  off). Allowed and named: the node cannot know whether its update arrived,
  so it counts it, which over-states ε and never under-states it.
* **released vs. on disk**: each accepted reply's released ledger has as many
  rounds as the disk ledger up to that round (none missing, none extra).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from client.privacy.ledger_store import LEDGER_FILE
from common.ledger.privacy_ledger import PrivacyLedger

LEDGER_RULE = (
    "a node persists each round's ledger step before its update leaves: an accepted "
    "update missing from the ledger is LOST, a (run, round) twice is DOUBLE-COUNTED "
    "(both must be 0); a step for an update that never arrived is CHARGED-NOT-"
    "DELIVERED (allowed, conservative, named with the drop-out's reason)"
)
ACCURACY_TOLERANCE_POINTS = 2.0


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fault_near(events: list[dict[str, Any]], node: int, round_: int) -> str | None:
    """What the harness did to ``node`` in ``round_`` (or the round before), if any."""
    hits = [
        e["kind"] for e in events
        if node in e["nodes"] and e["round"] in (round_, round_ - 1) and not e.get("error")
    ]  # fmt: skip
    return hits[0] if hits else None


def node_verdict(
    index: int,
    rounds: list[dict[str, Any]],
    ledger: PrivacyLedger | None,
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    """One node's ledger against the rounds the server accepted from it."""
    accepted: list[int] = []
    released: dict[int, int | None] = {}
    dropped: dict[int, str] = {}
    for record in rounds:
        for c in record["clients"]:
            if c["partition_id"] == index and c["status"] == "trained":
                accepted.append(record["round"])
                released[record["round"]] = c.get("rounds_trained")
        for d in record.get("dropped") or ():
            if d.get("partition_id") == index:
                dropped[record["round"]] = d["reason"]
    out: dict[str, Any] = {"accepted_rounds": accepted}
    if ledger is None:
        out.update(ledger=None, lost=[], double_counted=[], charged_not_delivered=[])
        out["exact"] = not accepted or None  # None: nothing on disk to check against
    else:
        pairs = list(zip(ledger.runs, ledger.rounds, strict=True))
        twice = sorted({p for p, n in Counter(pairs).items() if n > 1})
        on_disk = set(ledger.rounds)
        lost = [r for r in accepted if r not in on_disk]
        accepted_set = set(accepted)
        last_at = {r: pos for pos, (_, r) in enumerate(pairs)}  # in the order spent
        charged = [
            {"run": run, "round": r,
             "why": dropped.get(r) or _fault_near(events, index, r) or "not accepted"}
            for pos, (run, r) in enumerate(pairs)
            if r not in accepted_set or pos != last_at[r]
        ]  # fmt: skip
        mismatched = [
            r for r in accepted
            if released.get(r) is not None
            and released[r] != sum(1 for _, rr in pairs if rr <= r)
        ]  # fmt: skip
        out.update(
            ledger={"rounds": list(ledger.rounds), "runs": sorted(set(ledger.runs)),
                    "steps": ledger.total_steps, "epsilon": ledger.epsilon()},
            lost=lost, double_counted=[list(p) for p in twice],
            charged_not_delivered=charged, released_mismatch=mismatched,
        )  # fmt: skip
        out["exact"] = not lost and not twice and not mismatched
    out["dropped"] = [{"round": r, "reason": why} for r, why in sorted(dropped.items())]
    out["rejoined"] = [e["what"] for e in events if index in e["nodes"] and e.get("rejoin")]
    return out


def _secagg(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rounds unmasked and abandoned, and each drop-out with its protocol stage."""
    facts = [
        (r["round"], (r.get("client_level") or {}).get("secure_aggregation"))
        for r in rounds
    ]
    facts = [(n, f) for n, f in facts if f]
    if not facts:
        return None
    return {
        "unmasked": sum(bool(f.get("unmasked")) for _, f in facts),
        "abandoned": sum(not f.get("unmasked") for _, f in facts),
        "failures": [f"round {n}: {f['failure']}" for n, f in facts if f.get("failure")],
        "dropouts": [
            {"round": n, "stage": stage, "node_id": node}
            for n, f in facts
            for stage, nodes in (f.get("dropped") or {}).items()
            for node in nodes
        ],
    }


def soak_verdict(
    results_dir: Path,
    nodes: int,
    faults: str,
    wall_seconds: float,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """The whole verdict (also written to ``soak-verdict.json``)."""
    rounds = _lines(results_dir / "rounds.jsonl")
    events = _lines(results_dir / "faults.jsonl")
    summary_file = results_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    numbers = [r["round"] for r in rounds]
    per_node = {}
    for i in range(nodes):
        path = results_dir / "nodes" / f"node-{i}" / LEDGER_FILE
        ledger = PrivacyLedger.from_json(path.read_text()) if path.exists() else None
        per_node[str(i)] = node_verdict(i, rounds, ledger, events)
    statuses = Counter(c["status"] for r in rounds for c in r["clients"])
    drops = Counter(d["reason"] for r in rounds for d in r.get("dropped") or ())
    final = (rounds[-1]["central"] or {}).get("accuracy") if rounds else None
    verdict: dict[str, Any] = {
        "status": summary.get("status"),
        "rounds_planned": summary.get("rounds_planned"),
        "rounds_completed": len(set(numbers)),
        "duplicate_rounds": sorted(n for n, k in Counter(numbers).items() if k > 1),
        "missing_rounds": sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers)),
        "updates": {
            "accepted": statuses["trained"],
            "refused_by_server": statuses["rejected"],
            "refused_by_node": statuses["budget-exhausted"] + statuses["policy-refused"],
            # Each instructed node-round lands in one bucket: a Flower error reply
            # is a drop-out (link or error) and counted there, never also here.
            "failed": drops["error"]
            + sum(n for s, n in statuses.items() if s.endswith("-error")),
            "lost": drops["timeout"] + drops["link"],
        },
        "dropped": dict(drops),
        "ledger_rule": LEDGER_RULE,
        "nodes": per_node,
        "ledger_steps_lost": sum(len(v["lost"]) for v in per_node.values()),
        "ledger_steps_double_counted": sum(
            len(v["double_counted"]) for v in per_node.values()
        ),
        "charged_not_delivered": sum(
            len(v["charged_not_delivered"]) for v in per_node.values()
        ),
        "secure_aggregation": _secagg(rounds),
        "final_accuracy": final,
        "faults": faults,
        "fault_events": len(events),
        "faults_not_played": [
            f"round {e['round']}: {e['kind']} {e['nodes']}: {e['what']}"
            for e in events
            if e.get("error")
        ],
        "wall_seconds": round(wall_seconds, 1),
    }
    if baseline is not None:
        base = _lines(baseline / "rounds.jsonl")
        base_acc = (base[-1]["central"] or {}).get("accuracy") if base else None
        verdict["baseline_accuracy"] = base_acc
        if base_acc is not None and final is not None:
            verdict["accuracy_gap_points"] = round(100 * (base_acc - final), 2)
    verdict["problems"] = problems(verdict)
    verdict["verdict"] = "PASS" if not verdict["problems"] else "FAIL"
    return verdict


def problems(v: dict[str, Any]) -> list[str]:
    """Why the verdict fails (empty when it passes)."""
    out = []
    if v["status"] != "completed":
        out.append(f"the run ended {v['status']!r}, not completed")
    if v["rounds_planned"] and v["rounds_completed"] != v["rounds_planned"]:
        out.append(f"{v['rounds_completed']} of {v['rounds_planned']} distinct rounds")
    if v["duplicate_rounds"] or v["missing_rounds"]:
        out.append(
            f"rounds.jsonl: duplicates {v['duplicate_rounds']}, "
            f"missing {v['missing_rounds']}"
        )
    for i, node in v["nodes"].items():
        if node["exact"] is False:
            out.append(
                f"node {i}: ledger not exact (lost {node['lost']}, double "
                f"{node['double_counted']}, released mismatch "
                f"{node.get('released_mismatch')})"
            )
    out += [f"fault {what}" for what in v["faults_not_played"]]
    gap = v.get("accuracy_gap_points")
    if gap is not None and gap > ACCURACY_TOLERANCE_POINTS:
        out.append(f"accuracy {gap:.2f} points below the fault-free run")
    return out


def verdict_text(v: dict[str, Any]) -> str:
    """The printed verdict: one block an operator can read."""
    u = v["updates"]
    lines = [
        f"[soak] verdict {v['verdict']}: {v['status']}, {v['rounds_completed']}/"
        f"{v['rounds_planned']} rounds, {v['wall_seconds']:.0f} s; faults: "
        f"{v['faults'] or 'none'}",
        f"[soak] updates accepted {u['accepted']}, refused by server "
        f"{u['refused_by_server']}, refused by node {u['refused_by_node']}, failed "
        f"{u['failed']}, lost {u['lost']} (dropped: {v['dropped'] or 'none'})",
        f"[soak] ledgers: {v['ledger_steps_lost']} steps lost, "
        f"{v['ledger_steps_double_counted']} double-counted, "
        f"{v['charged_not_delivered']} charged-not-delivered (allowed)",
    ]
    for i, node in v["nodes"].items():
        led = node["ledger"]
        lines.append(
            f"[soak]   node {i}: accepted {node['accepted_rounds']}; ledger "
            f"{led['rounds'] if led else 'none'}; dropped "
            f"{[(d['round'], d['reason']) for d in node['dropped']] or '-'}"
            + (f"; rejoined: {'; '.join(node['rejoined'])}" if node["rejoined"] else "")
        )
    if v["secure_aggregation"]:
        s = v["secure_aggregation"]
        stages = ", ".join(
            f"round {d['round']} node {d['node_id']} at {d['stage']}" for d in s["dropouts"]
        )
        lines.append(
            f"[soak] secure aggregation: {s['unmasked']} rounds unmasked, "
            f"{s['abandoned']} abandoned {s['failures'] or ''}; drop-outs: {stages or '-'}"
        )
    acc = v["final_accuracy"]
    base = v.get("baseline_accuracy")
    lines.append(
        f"[soak] accuracy {acc if acc is None else f'{acc:.4f}'}"
        + (
            f" vs fault-free {base:.4f} ({v['accuracy_gap_points']:+.2f} points)"
            if base is not None and acc is not None
            else ""
        )  # fmt: skip
    )
    lines += [f"[soak] PROBLEM: {p}" for p in v["problems"]]
    return "\n".join(lines)
