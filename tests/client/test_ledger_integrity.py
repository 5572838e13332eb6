"""Ledger integrity: a rolled-back, deleted or diverged ledger is noticed and refused.

The node keeps a hash chain in its ledger file and its newest head in
``privacy-ledger.head.json``; the server witnesses each node's fingerprint in
``ledger-witness.json`` and sends it back with every train instruction. Each test
plays the failure (a backup restored, a file deleted, a state folder wiped, a file
rolled back under a running round) through the real ClientApp handler and the real
strategy, in process.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
import client.train_evaluate as client_training
from client.privacy.ledger_store import LEDGER_FILE, RECORD_FILE
from client.privacy.resent_reply import JOURNAL_FILE
from common.config import RunConfig
from common.ledger.chain import WITNESS_HEAD_KEY, WITNESS_LENGTH_KEY, LedgerFingerprint
from common.ledger.privacy_ledger import PrivacyLedger
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from server.app import make_strategy
from server.checks.ledger_witness import WITNESS_FILE, LedgerWitness, WitnessError
from server.results.client_outcomes import ClientOutcome
from server.strategies.private_fedavg import PrivateFedAvg
from tests.helpers.device import write_policy
from tests.helpers.messages import make_message, train_message

CFG = RunConfig(num_rounds=4, target_epsilon=8.0)
NODES = {5: 0, 6: 1}  # Flower node id -> partition


@pytest.fixture(autouse=True)
def _server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity a ServerApp process has, so the strategy can build messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _arrays() -> ArrayRecord:
    return ArrayRecord(build_model("digits", seed=0).state_dict())


def _context(state: Path, run_id: int, node_id: int = 5) -> Context:
    """One node's context for one run: a SuperNode keeps its state for the run."""
    node = {"partition-id": NODES[node_id], "num-partitions": 4, "state-dir": str(state)}
    return Context(run_id=run_id, node_id=node_id, node_config=node, state=RecordDict(),
                   run_config=CFG.to_run_config())  # fmt: skip


def _train(ctx: Context, server_round: int) -> TrainReport:
    reply = client_app.train(train_message(_arrays(), server_round), ctx)
    return TrainReport.from_content(reply.content)


def _on_disk(state: Path) -> PrivacyLedger:
    return PrivacyLedger.from_json((state / LEDGER_FILE).read_text())


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("trained on a rolled-back or deleted ledger")

    monkeypatch.setattr(client_training, "train_private", forbidden)


class _Grid:
    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def _server_round(
    strategy: PrivateFedAvg, server_round: int, contexts: dict[int, Context]
) -> tuple[list[Message], list[ClientOutcome]]:
    """One training round: the strategy's instructions, delivered to each node."""
    sent = list(
        strategy.configure_train(
            server_round, _arrays(), ConfigRecord(), _Grid(list(contexts))
        )
    )
    replies = []
    for message in sent:
        node_id = message.metadata.dst_node_id
        delivered = make_message(message.content, MessageType.TRAIN, node_id)
        replies.append(client_app.train(delivered, contexts[node_id]))
    strategy.aggregate_train(server_round, replies)
    return sent, strategy.last_outcomes


def _federation(tmp_path: Path) -> tuple[dict[int, Path], Path]:
    states = {n: write_policy(tmp_path / f"node-{n}") for n in NODES}
    return states, tmp_path / "results" / WITNESS_FILE


def _run(
    states: dict[int, Path], witness: Path, run_id: int, rounds: int
) -> list[tuple[list[Message], list[ClientOutcome]]]:
    """A run of ``rounds`` rounds, with a fresh strategy reading the witness file."""
    strategy = make_strategy(CFG, witness=LedgerWitness(witness))
    contexts = {n: _context(state, run_id, n) for n, state in states.items()}
    return [_server_round(strategy, r, contexts) for r in range(1, rounds + 1)]


def _witnessed(witness: Path) -> dict[str, dict]:
    return json.loads(witness.read_text())["nodes"]


def _status(outcomes: list[ClientOutcome]) -> dict[int, Status]:
    return {o.node_id: o.status for o in outcomes}


# --- the node's own record ---------------------------------------------------------------


def test_rollback_between_runs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older copy of the ledger file put back between runs is refused, with a reason."""
    state = write_policy(tmp_path / "state")
    run = _context(state, run_id=1)
    assert _train(run, 1).status is Status.TRAINED
    older = (state / LEDGER_FILE).read_bytes()
    assert _train(run, 2).status is Status.TRAINED
    (state / LEDGER_FILE).write_bytes(older)  # a backup of the ledger file restored

    _forbid_training(monkeypatch)
    report = _train(_context(state, run_id=2), 1)
    assert report.status is Status.LEDGER_ERROR
    assert report.reason == (
        f"this node's ledger has length 1, but its record {RECORD_FILE} saw it at "
        "length 2: it was rolled back or deleted; refusing to restart its privacy "
        "accounting from an older ledger"
    )
    assert str(tmp_path) not in report.reason
    assert (state / LEDGER_FILE).read_bytes() == older  # refused, not overwritten


def test_deleted_ledger_between_runs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger file deleted between runs does not restart the accounting from zero."""
    state = write_policy(tmp_path / "state")
    assert _train(_context(state, run_id=1), 1).status is Status.TRAINED
    (state / LEDGER_FILE).unlink()

    _forbid_training(monkeypatch)
    report = _train(_context(state, run_id=2), 1)
    assert report.status is Status.LEDGER_ERROR
    assert f"{LEDGER_FILE} is missing, but {RECORD_FILE} says" in str(report.reason)
    assert "the ledger was deleted" in str(report.reason)
    assert not (state / LEDGER_FILE).exists()


def test_an_edited_ledger_or_a_corrupt_record_is_refused(tmp_path: Path) -> None:
    """A ledger whose chain does not commit to its history, or a bad record: refused."""
    state = write_policy(tmp_path / "state")
    assert _train(_context(state, run_id=1), 1).status is Status.TRAINED
    data = json.loads((state / LEDGER_FILE).read_text())
    data["history"][0][2] = 1  # fewer steps: a smaller ε
    (state / LEDGER_FILE).write_text(json.dumps(data))
    report = _train(_context(state, run_id=2), 1)
    assert report.status is Status.LEDGER_ERROR
    assert f"{LEDGER_FILE} is unreadable or corrupt" in str(report.reason)

    state = write_policy(tmp_path / "other")
    assert _train(_context(state, run_id=1), 1).status is Status.TRAINED
    (state / RECORD_FILE).write_text('{"format": "privfed-ledger-head/1", "length": 1}')
    report = _train(_context(state, run_id=2), 1)
    assert report.status is Status.LEDGER_ERROR
    assert f"{RECORD_FILE} is unreadable or corrupt" in str(report.reason)


def test_a_record_one_store_behind_is_a_crash_not_a_rollback(tmp_path: Path) -> None:
    """The record is written after the ledger: one store behind is a crash, caught up."""
    state = write_policy(tmp_path / "state")
    run = _context(state, run_id=1)
    assert _train(run, 1).status is Status.TRAINED
    record_after_1 = (state / RECORD_FILE).read_bytes()
    assert _train(run, 2).status is Status.TRAINED
    (state / RECORD_FILE).write_bytes(record_after_1)  # a crash between the two writes
    report = _train(_context(state, run_id=2), 1)
    assert report.status is Status.TRAINED
    assert report.fingerprint is not None and report.fingerprint.length == 3
    assert json.loads((state / RECORD_FILE).read_text())["length"] == 3


# --- within a run ------------------------------------------------------------------------


@pytest.mark.parametrize("restored", [[LEDGER_FILE], [LEDGER_FILE, RECORD_FILE]])
def test_rollback_during_a_run_the_newer_ledger_in_memory_wins(
    tmp_path: Path, restored: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger file rolled back under a running node loses to the run's newer copy."""
    state = write_policy(tmp_path / "state")
    run = _context(state, run_id=1)
    assert _train(run, 1).status is Status.TRAINED
    older = {name: (state / name).read_bytes() for name in restored}
    second = _train(run, 2)
    assert second.status is Status.TRAINED and second.ledger is not None
    for name, content in older.items():
        (state / name).write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="privfed.client"):
        third = _train(run, 3)
    assert third.status is Status.TRAINED and third.ledger is not None
    assert third.ledger.rounds == (1, 2, 3)  # not (1, 3): round 2's spend is kept
    assert third.ledger.epsilon() > second.ledger.epsilon()
    assert _on_disk(state) == third.ledger  # written back
    assert third.fingerprint is not None and third.fingerprint.length == 3
    assert "rolled back during the run; the newer ledger wins" in caplog.text


def test_diverged_ledgers_within_a_run_are_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of another history than the run's copy is refused, never silently chosen."""
    state = write_policy(tmp_path / "state")
    run = _context(state, run_id=1)
    assert _train(run, 1).status is Status.TRAINED
    fork = tmp_path / "fork"
    shutil.copytree(state, fork)
    (fork / JOURNAL_FILE).unlink()  # else the fork re-sends round 1 instead of training
    assert _train(run, 2).status is Status.TRAINED
    assert _train(_context(fork, run_id=2), 1).status is Status.TRAINED  # the other branch
    for name in (LEDGER_FILE, RECORD_FILE):
        shutil.copy(fork / name, state / name)  # same length, another history

    _forbid_training(monkeypatch)
    report = _train(run, 3)
    assert report.status is Status.LEDGER_ERROR
    assert report.reason == (
        f"the ledger this run holds in memory (length 2) and {LEDGER_FILE} (length 2) "
        "have diverged: neither grew from the other; refusing to choose one"
    )


# --- the server's witness ----------------------------------------------------------------


def test_a_normal_multi_round_run_is_unaffected(tmp_path: Path) -> None:
    """Two runs of honest nodes: everyone trains, and the witness follows every store."""
    states, witness = _federation(tmp_path)
    first = _run(states, witness, run_id=1, rounds=3)
    for server_round, (sent, outcomes) in enumerate(first, start=1):
        assert _status(outcomes) == {5: Status.TRAINED, 6: Status.TRAINED}
        expect_witness = server_round > 1  # round 1 of a new federation: nothing seen
        for message in sent:
            config = message.content.config_records["config"]
            assert (WITNESS_LENGTH_KEY in config) is expect_witness
            if expect_witness:
                assert config[WITNESS_LENGTH_KEY] == server_round - 1
    seen = _witnessed(witness)
    for node, state in states.items():
        record = json.loads((state / RECORD_FILE).read_text())
        assert seen[str(node)]["length"] == record["length"] == 3
        assert seen[str(node)]["head"] == record["head"]
        assert seen[str(node)]["partition_id"] == NODES[node]
        assert _on_disk(state).rounds == (1, 2, 3)

    ((sent, outcomes),) = _run(states, witness, run_id=2, rounds=1)
    assert _status(outcomes) == {5: Status.TRAINED, 6: Status.TRAINED}
    assert all(m.content.config_records["config"][WITNESS_LENGTH_KEY] == 3 for m in sent)
    assert {n: e["length"] for n, e in _witnessed(witness).items()} == {"5": 4, "6": 4}
    assert all(_on_disk(s).runs == (1, 1, 1, 2) for s in states.values())


@pytest.mark.parametrize("how", ["wiped", "restored"])
def test_a_wiped_or_restored_state_folder_is_refused_by_the_server_witness(
    tmp_path: Path, how: str
) -> None:
    """What the node cannot see (its whole folder gone or put back), the server saw."""
    states, witness = _federation(tmp_path)
    backup = tmp_path / "backup"
    strategy = make_strategy(CFG, witness=LedgerWitness(witness))
    contexts = {n: _context(state, 1, n) for n, state in states.items()}
    _server_round(strategy, 1, contexts)
    shutil.copytree(states[5], backup)  # the whole folder after round 1
    _server_round(strategy, 2, contexts)
    shutil.rmtree(states[5])
    if how == "restored":
        shutil.copytree(backup, states[5])
    else:
        write_policy(states[5])  # the owner starts afresh with the same policy

    ((_, outcomes),) = _run(states, witness, run_id=2, rounds=1)
    assert _status(outcomes) == {5: Status.LEDGER_ERROR, 6: Status.TRAINED}
    (refused,) = [o for o in outcomes if o.node_id == 5]
    length = 1 if how == "restored" else 0
    assert refused.reason == (
        f"this node's ledger has length {length}, but the server saw it at length 2: "
        "it was rolled back or deleted; refusing to restart its privacy accounting from "
        "an older ledger"
    )
    assert _witnessed(witness)["5"]["length"] == 2  # never lowered
    assert (states[5] / LEDGER_FILE).exists() is (how == "restored")


def test_the_server_does_not_use_a_reply_behind_its_witness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that ignores the witness (an old client) still cannot fool the server."""
    states, witness = _federation(tmp_path)
    _run(states, witness, run_id=1, rounds=2)
    shutil.rmtree(states[5])
    write_policy(states[5])
    monkeypatch.setattr(client_training, "witnessed_in", lambda _config: None)

    ((_, outcomes),) = _run(states, witness, run_id=2, rounds=1)
    assert _status(outcomes) == {5: Status.ERROR, 6: Status.TRAINED}
    (failed,) = [o for o in outcomes if o.node_id == 5]
    assert failed.reason == (
        "ledger witness: node 5 reported its ledger at length 1, but this server saw "
        f"it at length 2 ({WITNESS_FILE}); its reply is not used"
    )
    assert _witnessed(witness)["5"]["length"] == 2


def test_a_bad_witness_file_names_the_file(tmp_path: Path) -> None:
    """A witness file that cannot be read stops the server, naming the file."""
    path = tmp_path / WITNESS_FILE
    path.write_text('{"format": "privfed-ledger-witness/1", "nodes": {"5": {"length": 2}}}')
    with pytest.raises(WitnessError, match=f"ledger witness {path} is unreadable"):
        LedgerWitness(path)
    seen = LedgerFingerprint("ab" * 32, 2)
    entry = {"5": seen.to_dict()}
    path.write_text(json.dumps({"format": "privfed-ledger-witness/1", "nodes": entry}))
    instruction = RecordDict({"config": ConfigRecord({"server-round": 1})})
    (message,) = LedgerWitness(path).annotate([Message(instruction, 5, "train")], "config")
    assert message.content.config_records["config"][WITNESS_HEAD_KEY] == seen.head
    assert WITNESS_HEAD_KEY not in instruction.config_records["config"]  # a copy
