"""Checkpoint and resume: the file survives crashes, names damage, and resumes exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message

import client.app as client_app
import common.atomic_files
from common.config import ConfigError, RunConfig
from common.tasks.models import build_model
from server.app import make_strategy
from server.results.checkpoint import (
    CHECKPOINT_FILE,
    RESUMABLE_KEYS,
    Checkpoint,
    Checkpointer,
    CheckpointError,
    check_resume_config,
    read_checkpoint,
    restore_strategy,
    resumed_rounds,
    write_checkpoint,
)
from server.results.outcome import close_run
from server.results.run_folder import ResultsWriter, write_summary
from simulations.launch.options import build_overrides, resume_overrides
from simulations.run import parse_args
from tests.helpers.messages import make_context, train_message

REPO = Path(__file__).resolve().parents[2]


def _checkpoint(server_round: int = 2, momentum: bool = True) -> Checkpoint:
    model = build_model("digits", seed=3).state_dict()
    return Checkpoint(
        round=server_round,
        model=model,
        momentum=tuple(np.full(t.shape, 0.5, np.float32) for t in model.values())
        if momentum
        else None,
        strategy={"client_level": {"clip_norm": 0.7}},
        run_config=RunConfig().to_run_config(),
        runs=({"run_id": 7, "first_round": 1, "last_round": server_round,
               "wall_seconds": 3.5},),
        round_record={"round": server_round, "central": {"accuracy": 0.5}},
        epsilon_by_partition={"0": 1.25, "1": None},
    )  # fmt: skip


def test_checkpoint_round_trips_every_part(tmp_path: Path) -> None:
    """Model, momentum, strategy state, runs, record and ε map come back equal."""
    saved = _checkpoint()
    write_checkpoint(tmp_path, saved)
    loaded = read_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.strategy == saved.strategy
    assert loaded.runs == saved.runs and loaded.round_record == saved.round_record
    assert loaded.epsilon_by_partition == {"0": 1.25, "1": None}
    assert loaded.model.keys() == saved.model.keys()
    for key in saved.model:
        assert torch.equal(loaded.model[key], saved.model[key])
    assert loaded.momentum is not None and saved.momentum is not None
    for got, want in zip(loaded.momentum, saved.momentum, strict=True):
        np.testing.assert_array_equal(got, want)
    write_checkpoint(tmp_path, _checkpoint(momentum=False))
    assert read_checkpoint(tmp_path).momentum is None


def test_a_crash_while_writing_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced by rename: a write that dies keeps round 1, no temp file."""
    write_checkpoint(tmp_path, _checkpoint(1))

    def die(src: str, dst: str) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(common.atomic_files.os, "replace", die)
    with pytest.raises(OSError, match="killed mid-write"):
        write_checkpoint(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    assert read_checkpoint(tmp_path).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


def test_missing_and_damaged_checkpoints_are_named(tmp_path: Path) -> None:
    """Missing, truncated or bit-flipped: a CheckpointError naming the file."""
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is missing"):
        read_checkpoint(tmp_path)
    write_checkpoint(tmp_path, _checkpoint())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        CheckpointError, match=f"checkpoint {path} is unreadable or corrupt"
    ):
        read_checkpoint(tmp_path)
    # One weight changed in place (same size): only the digest can tell.
    target = build_model("digits", seed=3).state_dict()
    first = next(iter(target.values())).flatten()[0].numpy().tobytes()
    at = whole.find(first)
    assert at > 0
    flipped = bytearray(whole)
    flipped[at] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256 digest does not match"):
        read_checkpoint(tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(tmp_path)


def test_only_allowed_keys_may_change_on_resume() -> None:
    """More rounds or timeouts pass; δ, privacy mode, dataset, seed, clients are named."""
    saved = RunConfig().to_run_config()
    check_resume_config(saved, {**saved, "num-rounds": 9, "round-timeout": 60.0})
    for key, value in [
        ("delta", 2e-5),
        ("privacy-mode", "client"),
        ("task", "mnist"),
        ("partitioner", "dirichlet"),
        ("dirichlet-alpha", 0.1),
        ("seed", 7),
        ("accountant", "prv"),
        ("min-available-nodes", 3),
        ("target-epsilon", 4.0),
    ]:
        with pytest.raises(ConfigError, match=f"run config key '{key}'"):
            check_resume_config(saved, {**saved, key: value})


def test_resumed_rounds_never_lose_or_repeat_a_round(tmp_path: Path) -> None:
    """A line missing after the checkpoint is restored; a cut line dropped; no extras."""
    ckpt = _checkpoint(2)
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2, "cen')
    assert [r["round"] for r in resumed_rounds(tmp_path, ckpt)] == [1, 2]
    rounds.write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
    assert [r["round"] for r in resumed_rounds(tmp_path, ckpt)] == [1, 2]
    rounds.write_text(json.dumps({"round": 3}) + "\n")
    with pytest.raises(CheckpointError, match="do not belong to one run"):
        resumed_rounds(tmp_path, ckpt)

    # The writer rewrites the file whole and keeps appending after it.
    (tmp_path / "config.json").write_text(json.dumps({"run_config": {}}))
    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    rounds.write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2, "cen')
    writer = ResultsWriter(tmp_path, RunConfig(), resumed_rounds(tmp_path, ckpt))
    writer.append_round({"round": 3})
    lines = [json.loads(line)["round"] for line in rounds.read_text().splitlines()]
    assert lines == [1, 2, 3]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["resumes"][0]["previous_status"] == "interrupted"
    assert not (tmp_path / "summary.json").exists()


def _replies(cfg: RunConfig, server_round: int, arrays: ArrayRecord) -> list[Message]:
    contexts = [make_context(cfg, pid, 3, node_id=40 + pid) for pid in (0, 1)]
    return [
        client_app.train(train_message(arrays, server_round, node_id=c.node_id), c)
        for c in contexts
    ]


def test_fedavgm_momentum_continues_exactly_after_a_resume(tmp_path: Path) -> None:
    """Replaying the same client updates: resumed round 3 == uninterrupted round 3."""
    cfg = RunConfig(
        num_rounds=3, target_epsilon=0.0, noise_multiplier=1.0, server_momentum=0.9,
        update_compression="none",  # averaged without a validator (which decodes)
    )  # fmt: skip
    x0 = ArrayRecord(build_model("digits", seed=0).state_dict())
    replies = _replies(cfg, 1, x0)  # the same updates every round (replayed)

    whole = make_strategy(cfg)
    whole.current_arrays = x0
    # Replaying one round's replies is what update validation rejects (their ledgers
    # do not record the later rounds): this test checks the optimiser arithmetic only.
    whole.validator = None
    for server_round in (1, 2):
        arrays, _ = whole.aggregate_train(server_round, replies)
    assert arrays is not None
    checkpointer = Checkpointer(tmp_path, cfg, whole, 1, time.monotonic())
    checkpointer(2, arrays, {"round": 2, "clients": []}, time.monotonic())
    uninterrupted, _ = whole.aggregate_train(3, replies)

    ckpt = read_checkpoint(tmp_path)
    resumed = make_strategy(cfg)
    resumed.validator = None
    restore_strategy(resumed, ckpt)
    assert resumed.momentum_vector is not None
    for got, want in zip(resumed.momentum_vector, whole.momentum_vector or [], strict=True):
        assert got.shape == want.shape
    after, _ = resumed.aggregate_train(3, replies)
    reset = make_strategy(cfg)  # what a resume without the optimiser state would do
    reset.validator = None
    reset.current_arrays = ckpt.arrays
    without, _ = reset.aggregate_train(3, replies)
    assert after is not None and uninterrupted is not None and without is not None
    key = next(iter(after.keys()))
    np.testing.assert_allclose(after[key].numpy(), uninterrupted[key].numpy(), rtol=1e-6)
    assert not np.allclose(without[key].numpy(), uninterrupted[key].numpy(), rtol=1e-3)


def test_resume_refuses_a_changed_delta_before_anything_starts(tmp_path: Path) -> None:
    """--resume with another δ or privacy mode: exit 2, the key named, no process."""
    results = tmp_path / "run"
    results.mkdir()
    cfg = RunConfig(num_rounds=4, min_available_nodes=2, results_dir=str(results))
    (results / "config.json").write_text(json.dumps({"run_config": cfg.to_run_config()}))
    write_checkpoint(results, _checkpoint(2))
    lines = [json.dumps({"round": r}) + "\n" for r in (1, 2)]
    (results / "rounds.jsonl").write_text("".join(lines))
    for module, option, key in (
        ("simulations.run", ["--delta", "2e-5"], "delta"),
        ("simulations.deploy", ["--privacy-mode", "none"], "privacy-mode"),
    ):
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", module, "--resume", str(results), *option],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert f"run config key '{key}'" in out.stderr
        assert "a resumed run must keep" in out.stderr
        assert "SuperLink" not in out.stdout  # nothing was started
        assert time.monotonic() - started < 60
    (results / CHECKPOINT_FILE).write_bytes(b"garbage")
    args = parse_args(["--resume", str(results)])
    with pytest.raises(ConfigError, match=str(results / CHECKPOINT_FILE)):
        resume_overrides(args)


def test_client_level_resume_keeps_the_federation_ledger_and_clip_norm(
    tmp_path: Path,
) -> None:
    """The ledger may hold the in-flight round (written first): kept; a ledger behind
    the checkpoint, or another population, is refused by name."""
    cfg = RunConfig(
        privacy_mode="client", target_epsilon=0.0, noise_multiplier=1.0, num_rounds=4,
        client_sampling_rate=0.5, clipping="adaptive", clipped_count_stddev=1.0,
    )  # fmt: skip
    nodes = [11, 12, 13, 14]
    first = make_strategy(cfg, tmp_path, run_id=1)
    first.start_run(nodes)
    assert first.dp is not None
    first.dp.clip_norm = 0.37  # as adaptive clipping left it after round 1
    first.ledger.record_round(1, 1.0, 0.5, {})
    arrays = ArrayRecord(build_model("digits", seed=0).state_dict())
    Checkpointer(tmp_path, cfg, first, 1, time.monotonic())(
        1, arrays, {"round": 1, "clients": []}, time.monotonic()
    )
    first.ledger.record_round(2, 1.0, 0.5, {})  # in flight when the server died
    ckpt = read_checkpoint(tmp_path)

    resumed = make_strategy(cfg, tmp_path, run_id=2)
    resumed.start_run(nodes)
    restore_strategy(resumed, ckpt)
    assert resumed.dp is not None and resumed.dp.clip_norm == 0.37
    assert resumed.ledger.ledger.rounds == (1, 2) and resumed.ledger.ledger.runs == (1, 1)
    assert resumed.ledger.epsilon() == pytest.approx(first.ledger.epsilon())
    resumed.ledger.record_round(2, 1.0, 0.5, {})  # the rerun: a new release
    assert resumed.ledger.ledger.rounds == (1, 2, 2)

    fewer = make_strategy(cfg, tmp_path, run_id=3)
    fewer.start_run(nodes[:3])
    with pytest.raises(CheckpointError, match="n = 4"):
        restore_strategy(fewer, ckpt)
    rolled_back = make_strategy(cfg, tmp_path / "other", run_id=3)
    rolled_back.start_run(nodes)
    rolled_back.ledger.record_round(1, 1.0, 0.5, {})  # another history, run 3
    with pytest.raises(CheckpointError, match="does not extend the ledger"):
        restore_strategy(rolled_back, ckpt)


def test_resume_key_alone_is_refused_by_the_launchers(tmp_path: Path) -> None:
    """--set resume=true without --resume would skip the launcher's checks: refused."""
    args = parse_args(["--set", "resume=true", "--results-dir", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="run config key 'resume'.*--resume"):
        build_overrides(args)


def test_simulated_client_ledger_outlives_the_simulation(tmp_path: Path) -> None:
    """With a results folder, a partition's ledger is a file that a new simulation
    (fresh context.state, new run id) continues; deleted, the client fails closed."""
    cfg = RunConfig(
        num_rounds=4, target_epsilon=0.0, noise_multiplier=1.0, results_dir=str(tmp_path)
    )
    arrays = ArrayRecord(build_model("digits", seed=0).state_dict())
    first = make_context(cfg, 1, 3, node_id=7)
    reply = client_app.train(train_message(arrays, 1, node_id=7), first)
    assert reply.content["report"]["status"] == "trained"
    ledger_file = tmp_path / "nodes" / "partition-1" / "privacy-ledger.json"
    one_round = json.loads(ledger_file.read_text())
    assert one_round["rounds"] == [1]

    resumed = make_context(cfg, 1, 3, node_id=99)  # the resumed simulation's node
    resumed.run_id = 2
    reply = client_app.train(train_message(arrays, 2, node_id=99), resumed)
    assert reply.content["report"]["status"] == "trained"
    two_rounds = json.loads(ledger_file.read_text())
    assert two_rounds["rounds"] == [1, 2] and two_rounds["runs"] == [1, 2]
    assert two_rounds["history"][0][2] == 2 * one_round["history"][0][2]

    ledger_file.unlink()
    again = make_context(cfg, 1, 3, node_id=100)
    reply = client_app.train(train_message(arrays, 3, node_id=100), again)
    assert reply.content["report"]["status"] == "ledger-error"


def test_an_earlier_runs_summary_does_not_stand_for_a_resumed_one(tmp_path: Path) -> None:
    """A resumed ServerApp that wrote nothing: the old 'completed' summary is not
    reported as this run's outcome; the launcher writes a failed one."""
    write_summary(tmp_path, {"status": "completed", "stop_reason": "all 2 rounds"})
    launched = time.time() + 1  # the resume started after that summary was written
    summary = close_run(tmp_path, None, "flwr run exited with code 1", 4, launched)
    assert summary["status"] == "failed" and summary["written_by"] == "launcher"
    assert close_run(tmp_path, None, "exit 0", 4, time.time() - 60)["status"] == "failed"
    write_summary(tmp_path, {"status": "completed", "stop_reason": "all 4 rounds"})
    assert close_run(tmp_path, None, "exit 0", 4, time.time() - 60)["status"] == "completed"


def test_docs_list_exactly_the_keys_a_resume_may_change() -> None:
    """docs/troubleshooting.md's 'Resuming a run' names the keys of RESUMABLE_KEYS, no
    more, no less."""
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    section = text.split("\n## Resuming a run\n", 1)[1].split("\n## ", 1)[0]
    listed = re.search(r"a change to any key except (.+?): δ", section, flags=re.S)
    assert listed is not None
    keys = set(re.findall(r"`([a-z-]+)`", listed.group(1)))
    assert keys == set(RESUMABLE_KEYS) - {"results-dir", "resume"}


def test_update_validation_remembers_each_nodes_ledger_across_a_resume(
    tmp_path: Path,
) -> None:
    """A node whose ledger went back is still refused in the first resumed round."""
    from common.ledger.privacy_ledger import PrivacyLedger
    from server.checks.update_validation import UpdateRejected, _check_extends

    cfg = RunConfig(num_rounds=3, target_epsilon=0.0, noise_multiplier=1.0)
    ledger = PrivacyLedger("rdp", 1e-5).extended(1, 1.0, 0.1, 10).extended(2, 1.0, 0.1, 10)
    whole = make_strategy(cfg)
    assert whole.validator is not None
    whole.validator.accepted[7] = ledger
    arrays = ArrayRecord(build_model("digits", seed=0).state_dict())
    whole.current_arrays = arrays
    Checkpointer(tmp_path, cfg, whole, 1, time.monotonic())(
        2, arrays, {"round": 2, "clients": []}, time.monotonic()
    )
    resumed = make_strategy(cfg)
    assert resumed.validator is not None and not resumed.validator.accepted
    restore_strategy(resumed, read_checkpoint(tmp_path))
    assert resumed.validator.accepted == {7: ledger}
    rolled_back = PrivacyLedger("rdp", 1e-5).extended(3, 1.0, 0.1, 10)
    with pytest.raises(UpdateRejected, match="not more than"):
        _check_extends(resumed.validator.accepted[7], rolled_back, grew=True)


def test_an_audit_run_cannot_be_resumed() -> None:
    """The audit needs the whole run in one process: a resume of one is refused."""
    saved = RunConfig(audit="one-run", audit_canaries=100).to_run_config()
    with pytest.raises(ConfigError, match="run config key 'audit': an audit run cannot"):
        check_resume_config(saved, saved)


def test_the_checkpoint_names_clients_as_the_summary_does() -> None:
    """A node serving its own data (partition -1) is 'node-<id>' in both, so a resumed
    summary does not list it twice or fold several such nodes into one."""
    from server.results.checkpoint import updated_epsilons
    from server.results.client_outcomes import partition_key

    record = {"clients": [
        {"partition_id": -1, "node_id": 9, "epsilon": 1.5},
        {"partition_id": -1, "node_id": 4, "epsilon": 0.5},
        {"partition_id": 2, "node_id": 7, "epsilon": None},
    ]}  # fmt: skip
    assert updated_epsilons({"2": 0.25}, record) == {
        "2": 0.25,
        "node-9": 1.5,
        "node-4": 0.5,
    }
    assert partition_key(-1, 9) == "node-9" and partition_key(2, 7) == "2"
