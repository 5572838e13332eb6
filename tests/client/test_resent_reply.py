"""A round asked again after a SuperLink restart is answered with the charged update.

Each test plays the server: it sends a node the same training request twice (as a
SuperLink killed mid-round and resumed from its checkpoint does), or a slightly
different one, and checks what the node releases and what its ledger on disk says.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

import client.app as client_app
import client.train_evaluate as client_training
from client.privacy.ledger_store import LEDGER_FILE
from client.privacy.resent_reply import JOURNAL_FILE
from common.config import RunConfig
from common.ledger.privacy_ledger import PrivacyLedger
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from tests.helpers.device import write_policy
from tests.helpers.messages import train_message

CFG = RunConfig(num_rounds=4, target_epsilon=8.0, update_compression="none")


def _arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(build_model("digits", seed=seed).state_dict())


def _context(state: Path, run_id: int, cfg: RunConfig = CFG) -> Context:
    """A deployed node's context in one Flower run (a resumed run has a new id)."""
    write_policy(state)
    node = {"partition-id": 0, "num-partitions": 4, "state-dir": str(state)}
    return Context(run_id=run_id, node_id=5, node_config=node, state=RecordDict(),
                   run_config=cfg.to_run_config())  # fmt: skip


def _on_disk(state: Path) -> PrivacyLedger:
    return PrivacyLedger.from_json((state / LEDGER_FILE).read_text())


def _update(reply: Message) -> list[np.ndarray]:
    return reply.content["arrays"].to_numpy_ndarrays()


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("trained a round whose update is already charged")

    monkeypatch.setattr(client_training, "train_private", forbidden)


def _killed_in_round_2(state: Path) -> Message:
    """Rounds 1 and 2 trained under run 7; the server dies before round 2 arrives."""
    ctx = _context(state, run_id=7)
    client_app.train(train_message(_arrays(), 1), ctx)
    return client_app.train(train_message(_arrays(), 2), ctx)


def test_the_same_request_again_gets_the_same_update_and_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed server (new run, same round, same model) asking again learns nothing
    new: the reply is byte for byte the first one, so averaging the two cannot thin
    the noise, and the ledger keeps one step for the round."""
    first = _killed_in_round_2(tmp_path)
    charged = _on_disk(tmp_path)
    assert charged.rounds == (1, 2)
    with monkeypatch.context() as m:
        _forbid_training(m)
        again = client_app.train(train_message(_arrays(), 2), _context(tmp_path, 8))
    for a, b in zip(_update(first), _update(again), strict=True):
        assert a.tobytes() == b.tobytes()
    assert again.content["arrays"].keys() == first.content["arrays"].keys()
    report = TrainReport.from_content(again.content)
    assert report.status is Status.TRAINED
    assert report.ledger is not None and report.ledger.rounds == (1, 2)
    assert _on_disk(tmp_path) == charged  # nothing spent, nothing rewritten
    nxt = client_app.train(train_message(_arrays(), 3), _context(tmp_path, 8))
    assert TrainReport.from_content(nxt.content).status is Status.TRAINED
    assert _on_disk(tmp_path).rounds == (1, 2, 3)
    assert _on_disk(tmp_path).runs == (7, 7, 8)


@pytest.mark.parametrize(
    "change",
    ["model", "setting"],
)
def test_a_different_request_for_the_round_is_trained_and_charged_again(
    tmp_path: Path, change: str
) -> None:
    """Another global model, or another training setting, is a new release: the node
    trains it with fresh noise and its ledger counts the round twice."""
    first = _killed_in_round_2(tmp_path)
    arrays, cfg = _arrays(), CFG
    if change == "model":
        arrays = _arrays(seed=1)
    else:
        cfg = replace(CFG, learning_rate=CFG.learning_rate / 2)
    again = client_app.train(train_message(arrays, 2), _context(tmp_path, 8, cfg))
    assert TrainReport.from_content(again.content).status is Status.TRAINED
    assert any(
        a.tobytes() != b.tobytes()
        for a, b in zip(_update(first), _update(again), strict=True)
    )
    assert _on_disk(tmp_path).rounds == (1, 2, 2)


def test_the_journal_is_not_replayed_once_the_ledger_moved_on(tmp_path: Path) -> None:
    """Round 2's reply is kept, but round 3 was trained since: asked round 2 again,
    the node trains and charges it (the journal no longer ends its ledger)."""
    _killed_in_round_2(tmp_path)
    (tmp_path / "round-2.bin").write_bytes((tmp_path / JOURNAL_FILE).read_bytes())
    client_app.train(train_message(_arrays(), 3), _context(tmp_path, 7))
    (tmp_path / JOURNAL_FILE).write_bytes((tmp_path / "round-2.bin").read_bytes())
    client_app.train(train_message(_arrays(), 2), _context(tmp_path, 8))
    assert _on_disk(tmp_path).rounds == (1, 2, 3, 2)


def test_a_corrupt_journal_costs_a_step_never_a_free_update(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged journal is never trusted: the node warns, trains and charges."""
    _killed_in_round_2(tmp_path)
    journal = tmp_path / JOURNAL_FILE
    head, _, body = journal.read_bytes().partition(b"\n")
    journal.write_bytes(head + b"\n" + body[: len(body) // 2] + b"\xff" * 8)
    with caplog.at_level(logging.WARNING, logger="privfed.client"):
        again = client_app.train(train_message(_arrays(), 2), _context(tmp_path, 8))
    assert TrainReport.from_content(again.content).status is Status.TRAINED
    assert _on_disk(tmp_path).rounds == (1, 2, 2)
    assert f"reply journal {journal} is corrupt" in caplog.text


def test_a_node_without_a_ledger_folder_keeps_no_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A simulation without a results folder cannot be resumed: nothing is written."""
    monkeypatch.chdir(tmp_path)
    ctx = Context(run_id=1, node_id=5, state=RecordDict(),
                  node_config={"partition-id": 0, "num-partitions": 4},
                  run_config=replace(CFG, results_dir="").to_run_config())  # fmt: skip
    client_app.train(train_message(_arrays(), 1), ctx)
    assert not list(tmp_path.rglob(JOURNAL_FILE))
