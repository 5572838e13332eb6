"""The soak's verdict, and how the server names the nodes that dropped out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Error, Message, Metadata

from client.privacy.ledger_store import LEDGER_FILE
from common.ledger.privacy_ledger import PrivacyLedger
from common.wire.reply_fields import Status
from server.messaging import CountingGrid
from server.results.client_outcomes import ClientOutcome
from server.results.dropouts import count_dropouts, dropouts, dropouts_text
from simulations.deployment.verdict import node_verdict, soak_verdict, verdict_text
from tests.helpers.messages import pushed_instruction

UNAVAILABLE = "Error: Node Unavailable — The destination node failed to report a heartbeat"


def _ledger(*rounds: int | tuple[int, int]) -> PrivacyLedger:
    ledger = PrivacyLedger("rdp", 1e-5)
    for r in rounds:
        run, rnd = r if isinstance(r, tuple) else (7, r)
        ledger = ledger.extended(rnd, 1.0, 0.1, 10, run_id=run)
    return ledger


def _round(n: int, trained: dict[int, int], dropped: dict[int, str] | None = None) -> dict:
    """A rounds.jsonl record: ``trained`` maps partition -> rounds in its ledger."""
    return {
        "round": n,
        "central": {"accuracy": 0.5 + n / 100},
        "clients": [
            {
                "partition_id": p,
                "node_id": 100 + p,
                "status": "trained",
                "rounds_trained": k,
            }
            for p, k in trained.items()
        ],  # fmt: skip
        "dropped": [
            {"node_id": 100 + p, "partition_id": p, "reason": why, "detail": None}
            for p, why in (dropped or {}).items()
        ],
    }


def test_exact_ledger_with_a_step_charged_for_an_update_that_never_arrived() -> None:
    rounds = [_round(1, {0: 1}), _round(2, {}, {0: "link"}), _round(3, {0: 3})]
    events = [
        {"kind": "kill", "nodes": [0], "round": 2, "what": "restarted", "rejoin": "x"}
    ]
    v = node_verdict(0, rounds, _ledger(1, 2, 3), events)
    assert v["exact"] is True and v["lost"] == [] and v["double_counted"] == []
    assert v["charged_not_delivered"] == [{"run": 7, "round": 2, "why": "link"}]
    assert v["dropped"] == [{"round": 2, "reason": "link"}]
    assert v["rejoined"] == ["restarted"]


def test_lost_double_counted_and_mismatched_steps_fail() -> None:
    rounds = [_round(1, {0: 1}), _round(2, {0: 2})]
    assert node_verdict(0, rounds, _ledger(1), [])["lost"] == [2]
    twice = PrivacyLedger(
        "rdp", 1e-5, _ledger(1, 2).entries, rounds=(1, 1, 2), runs=(7, 7, 7)
    )
    v = node_verdict(0, rounds, twice, [])
    assert v["double_counted"] == [[7, 1]] and v["exact"] is False
    # The reply of round 2 released 1 round, but the disk holds 2 up to round 2.
    v = node_verdict(0, [_round(1, {0: 1}), _round(2, {0: 1})], _ledger(1, 2), [])
    assert v["released_mismatch"] == [2] and v["exact"] is False


def test_a_resumed_round_trained_twice_is_charged_twice_not_double_counted() -> None:
    """Round 2 was trained under the killed SuperLink's run 7 and again in run 8."""
    rounds = [_round(1, {0: 1}), _round(2, {0: 3})]
    v = node_verdict(0, rounds, _ledger((7, 1), (7, 2), (8, 2)), [])
    assert v["exact"] is True and v["double_counted"] == []
    assert v["charged_not_delivered"] == [{"run": 7, "round": 2, "why": "not accepted"}]


def test_soak_verdict_file_level(tmp_path: Path) -> None:
    rounds = [_round(1, {0: 1, 1: 1}), _round(2, {0: 2}, {1: "timeout"})]
    (tmp_path / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
    summary = {"status": "completed", "rounds_planned": 2}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for i, led in ((0, _ledger(1, 2)), (1, _ledger(1))):
        folder = tmp_path / "nodes" / f"node-{i}"
        folder.mkdir(parents=True)
        (folder / LEDGER_FILE).write_text(led.to_json())
    base = tmp_path / "base"
    base.mkdir()
    (base / "rounds.jsonl").write_text(json.dumps(_round(2, {0: 2})) + "\n")
    v = soak_verdict(tmp_path, 2, "kill@2:nodes=1", 12.0, baseline=base)
    assert v["verdict"] == "PASS", v["problems"]
    assert v["updates"] == {"accepted": 3, "refused_by_server": 0, "refused_by_node": 0,
                            "failed": 0, "lost": 1}  # fmt: skip
    assert v["dropped"] == {"timeout": 1} and v["accuracy_gap_points"] == 0.0
    assert "verdict PASS" in verdict_text(v)
    summary["status"] = "failed"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    failed = soak_verdict(tmp_path, 2, "", 1.0)
    assert failed["verdict"] == "FAIL" and "ended 'failed'" in failed["problems"][0]
    # A fault the harness could not play fails the verdict: the soak did not test it.
    summary["status"] = "completed"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    what = "could not be played: round 2 ended before node(s) [1] ran a task"
    event = {
        "at": 0.0,
        "round": 2,
        "kind": "kill",
        "nodes": [1],
        "error": True,
        "what": what,
    }
    (tmp_path / "faults.jsonl").write_text(json.dumps(event) + "\n")
    unplayed = soak_verdict(tmp_path, 2, "kill@2+task:nodes=1", 1.0)
    assert unplayed["verdict"] == "FAIL"
    assert unplayed["problems"] == [
        "fault round 2: kill [1]: could not be played: round 2 ended before node(s) "
        "[1] ran a task"
    ]


def test_a_flower_error_reply_is_one_lost_update_not_also_a_failure(tmp_path: Path) -> None:
    """A killed node's round: Flower replies "Node Unavailable" on its behalf, so the
    round lists an ``error`` client *and* a ``link`` drop-out for the same update
    (seen in CI: 14 accepted + 1 lost + 1 failed of 15). It counts once, as lost;
    a ClientApp crash counts once, as failed."""
    r2 = _round(2, {0: 2}, {1: "link", 2: "error"})
    r2["clients"] += [
        {"partition_id": None, "node_id": 999, "status": "error", "reason": UNAVAILABLE},
        {"partition_id": 2, "node_id": 102, "status": "error", "reason": "boom"},
        {"partition_id": 3, "node_id": 103, "status": "data-error"},
    ]
    (tmp_path / "rounds.jsonl").write_text(json.dumps(r2) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    u = soak_verdict(tmp_path, 4, "", 1.0)["updates"]
    assert u == {"accepted": 1, "refused_by_server": 0, "refused_by_node": 0,
                 "failed": 2, "lost": 1}  # fmt: skip
    assert sum(u.values()) == 4  # one bucket per instructed node


# -- the server's side: dropped nodes in rounds.jsonl and the round line -------------


def test_dropouts_name_node_partition_and_reason() -> None:
    outcomes = [
        ClientOutcome(11, Status.TRAINED, partition_id=0),
        ClientOutcome(12, Status.REJECTED, partition_id=1, reason="norm"),
        ClientOutcome(13, Status.BUDGET_EXHAUSTED, partition_id=2),
        ClientOutcome(1, Status.ERROR, reason=UNAVAILABLE),  # Flower's, for node 14
    ]
    partitions = {11: 0, 12: 1, 13: 2, 14: 3}
    dropped = dropouts([11, 12, 13, 14, 15], outcomes, partitions, {14: UNAVAILABLE})
    assert [(d["node_id"], d["partition_id"], d["reason"]) for d in dropped] == [
        (12, 1, "refused"), (14, 3, "link"), (15, None, "timeout"),
    ]  # fmt: skip
    text = dropouts_text(dropped)
    assert text == (
        " | dropped 3: node 12 (partition 1) refused, node 14 (partition 3) link, "
        "node 15 timeout"
    )
    assert dropouts_text([]) == ""
    counts = count_dropouts([{"dropped": dropped}, {"dropped": []}, {}])
    assert counts == {"timeout": 1, "link": 1, "refused": 1, "error": 0}


class _FakeGrid:
    """Push returns IDs; pull answers with Flower's own error for node 14."""

    def __init__(self) -> None:
        self.pushed: list[Any] = []

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids: Any) -> list[Message]:
        error = Error(code=5, reason=UNAVAILABLE)
        meta = Metadata(
            run_id=1, message_id="r1", src_node_id=1, dst_node_id=1,
            reply_to_message_id="m1", group_id="", message_type="train",
            created_at=0.0, ttl=10.0,
        )  # fmt: skip
        return [Message(error, metadata=meta)]


def test_counting_grid_names_the_node_flowers_error_answers_for() -> None:
    fake = _FakeGrid()
    grid = CountingGrid(fake)  # type: ignore[arg-type]
    grid.push_messages([pushed_instruction(13), pushed_instruction(14)])
    (reply,) = grid.pull_messages(["m0", "m1"])
    assert grid.unavailable == {14: UNAVAILABLE}
    assert grid.up == {}
    # The reply comes from node 14, so the round's warning and outcome name node 14,
    # not the SuperLink (node 1) that wrote it.
    assert int(reply.metadata.src_node_id) == 14 and reply.error.reason == UNAVAILABLE
    assert reply.metadata.reply_to_message_id == "m1"


def test_secure_aggregation_rounds_and_their_drop_out_stages(tmp_path: Path) -> None:
    rounds = []
    for n, dropped in ((1, {}), (2, {"secagg_unmask": [104]})):
        record = _round(n, {0: n})
        record["client_level"] = {
            "secure_aggregation": {"unmasked": n == 1, "dropped": dropped,
                                   **({"failure": "too few shares"} if n == 2 else {})}
        }  # fmt: skip
        rounds.append(record)
    (tmp_path / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
    v = soak_verdict(tmp_path, 1, "", 1.0)
    sa = v["secure_aggregation"]
    assert sa["unmasked"] == 1 and sa["abandoned"] == 1
    assert sa["dropouts"] == [{"round": 2, "stage": "secagg_unmask", "node_id": 104}]
    assert sa["failures"] == ["round 2: too few shares"]
    assert "round 2 node 104 at secagg_unmask" in verdict_text(v)
