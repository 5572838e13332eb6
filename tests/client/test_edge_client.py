"""Edge nodes: local data files, a disk ledger that survives restarts, export, predict."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

import client.app as client_app
import client.train_evaluate as client_training
from client.data.shard_cache import CACHE_DIR
from client.node_settings import NodeConfigError, NodeSettings
from client.privacy.ledger_store import LEDGER_FILE, LOCK_FILE, RECORD_FILE
from client.privacy.policy import POLICY_FILE
from client.privacy.resent_reply import JOURNAL_FILE
from client.show_ledger import main as show_ledger
from common.config import RunConfig
from common.data.datasets import DatasetError, load_arrays
from common.data.local_files import load_local_arrays
from common.ledger.privacy_ledger import PrivacyLedger
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from server.export.torchscript import export_model
from tests.helpers.device import PREDICT_THEN_CHECK_IMPORTS, write_policy
from tests.helpers.messages import train_message

REPO = Path(__file__).resolve().parents[2]
# Run the predict command, then assert that no training code was imported.


def _raw_digits(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images[:n].astype(np.uint8), bunch.target[:n].astype(np.int64)


def _node_context(cfg: RunConfig, node_config: dict) -> Context:
    """A fresh context, as a new ClientApp process on a real SuperNode gets."""
    return Context(
        run_id=7, node_id=9, node_config=node_config, state=RecordDict(),
        run_config=cfg.to_run_config(),
    )  # fmt: skip


def _report(reply: object) -> TrainReport:
    return TrainReport.from_content(reply.content)  # type: ignore[attr-defined]


def _arrays() -> ArrayRecord:
    return ArrayRecord(build_model("digits", seed=0).state_dict())


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "'partition-id'"),
        ({"partition-id": 0}, "'num-partitions'"),
        ({"partition-id": 3, "num-partitions": 3}, "partition-id < num-partitions"),
        ({"data-path": "/x.npz", "partition-id": 0, "num-partitions": 2}, "not both"),
        ({"data-path": ""}, "'data-path'"),
        ({"data-path": "/x.npz", "state-dir": 5}, "'state-dir'"),
        ({"partition-id": "0", "num-partitions": 2}, "'partition-id'"),
        ({"data-path": "/x.npz", "colour": "red"}, "'colour'"),
        ({"data-path": "/x.npz"}, "needs 'state-dir'"),
    ],
)
def test_bad_node_config_names_the_key(node_config: dict, message: str) -> None:
    """Every bad node config fails with a message naming the key."""
    with pytest.raises(NodeConfigError, match=message):
        NodeSettings.from_node_config(node_config)


def test_local_npz_csv_and_idx_give_the_same_arrays(tmp_path: Path) -> None:
    """The three local formats load to identical normalised arrays."""
    images, labels = _raw_digits(50)
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    flat = images.reshape(len(images), -1)
    header = ",".join(["label"] + [f"p{i}" for i in range(64)])
    np.savetxt(
        tmp_path / "d.csv", np.column_stack([labels, flat]), delimiter=",",
        header=header, comments="", fmt="%d",
    )  # fmt: skip
    idx = tmp_path / "idx"
    idx.mkdir()
    with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4B3I", 0, 0, 8, 3, len(images), 8, 8) + images.tobytes())
    with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(
            struct.pack(">4BI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes()
        )
    x_npz, y_npz = load_local_arrays(str(tmp_path / "d.npz"), "digits")
    assert x_npz.shape == (50, 1, 8, 8) and x_npz.dtype == np.float32
    for other in (tmp_path / "d.csv", idx):
        x, y = load_local_arrays(str(other), "digits")
        np.testing.assert_array_equal(y, y_npz)
        np.testing.assert_allclose(x, x_npz)
    # Normalised exactly like the server's copy of the same images.
    server = load_arrays("digits", "", 0)
    scale_check = (images[0].astype(np.float32) / 16.0 - 0.3) / 0.4
    np.testing.assert_allclose(x_npz[0, 0], scale_check, rtol=1e-6)
    assert server.x_train.dtype == x_npz.dtype


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((5, 7, 7)), np.zeros(5), "shaped"),
        (np.zeros((5, 8, 8)), np.zeros(4), "5 images but 4 labels"),
        (np.zeros((5, 8, 8)), np.full(5, 12), "0..9"),
        (np.zeros((5, 8, 8)), np.full(5, 0.5), "integers"),
    ],
)
def test_bad_local_data_is_a_clear_error(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str
) -> None:
    """Wrong shapes or labels fail naming the file and the problem."""
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(DatasetError, match=message):
        load_local_arrays(str(tmp_path / "bad.npz"), "digits")
    with pytest.raises(DatasetError, match="'data-path'"):
        load_local_arrays(str(tmp_path / "missing.npz"), "digits")


def test_disk_ledger_survives_fresh_processes(tmp_path: Path) -> None:
    """Each round in a fresh context continues the ε on disk instead of resetting it."""
    images, labels = _raw_digits(300)
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    cfg = RunConfig(
        num_rounds=3, target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=50.0
    )
    state = write_policy(tmp_path / "state")
    node = {"data-path": str(tmp_path / "d.npz"), "state-dir": str(state)}
    eps = []
    for server_round in (1, 2, 3):
        report = _report(
            client_app.train(
                train_message(_arrays(), server_round), _node_context(cfg, node)
            )
        )
        assert report.status is Status.TRAINED and report.ledger is not None
        eps.append(report.ledger.epsilon())
        on_disk = PrivacyLedger.from_json((state / LEDGER_FILE).read_text())
        assert on_disk.rounds == tuple(range(1, server_round + 1))
        assert on_disk.epsilon() == pytest.approx(eps[-1])
    assert eps[0] < eps[1] < eps[2]
    ((_, rate, steps),) = report.ledger.history()
    one_shot = PrivacyLedger("rdp", cfg.delta).extended(1, 1.0, rate, steps)
    assert eps[2] == pytest.approx(one_shot.epsilon())
    assert sorted(p.name for p in state.iterdir()) == sorted(
        [LEDGER_FILE, RECORD_FILE, LOCK_FILE, POLICY_FILE, CACHE_DIR, JOURNAL_FILE]
    )


@pytest.mark.parametrize("corruption", ["{not json", '{"format": "other"}', ""])
def test_corrupt_ledger_fails_closed(
    tmp_path: Path, corruption: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable ledger makes the node refuse to train, with the file named."""
    state = write_policy(tmp_path / "state")
    (state / LEDGER_FILE).write_text(corruption)
    cfg = RunConfig(num_rounds=3)

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("trained despite a corrupt ledger")

    monkeypatch.setattr(client_training, "train_private", forbidden)
    node = {"partition-id": 0, "num-partitions": 4, "state-dir": str(state)}
    reply = client_app.train(train_message(_arrays(), 1), _node_context(cfg, node))
    report = _report(reply)
    assert report.status is Status.LEDGER_ERROR
    assert f"{LEDGER_FILE} is unreadable or corrupt" in str(report.reason)
    assert str(tmp_path) not in str(report.reason)  # the path and content stay local
    assert "arrays" not in reply.content.array_records
    assert (state / LEDGER_FILE).read_text() == corruption  # never overwritten


def test_deleted_ledger_mid_run_fails_closed(tmp_path: Path) -> None:
    """A ledger file that vanished after this node trained is not a fresh start."""
    cfg = RunConfig(num_rounds=3)
    state = write_policy(tmp_path / "s")
    node = {"partition-id": 0, "num-partitions": 4, "state-dir": str(state)}
    ctx = _node_context(cfg, node)
    assert (
        _report(client_app.train(train_message(_arrays(), 1), ctx)).status is Status.TRAINED
    )
    (state / LEDGER_FILE).unlink()
    report = _report(client_app.train(train_message(_arrays(), 2), ctx))
    assert report.status is Status.LEDGER_ERROR
    assert "missing" in str(report.reason)


def test_show_ledger_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger command prints ε with accountant and δ, and exits 1 when it can't."""
    ledger = (
        PrivacyLedger("rdp", 1e-5).extended(1, 1.0, 1 / 19, 95).extended(2, 1.0, 1 / 19, 95)
    )
    state = tmp_path / "state"
    state.mkdir()
    (state / LEDGER_FILE).write_text(ledger.to_json())
    assert show_ledger([str(state), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] == pytest.approx(ledger.epsilon())
    assert report["accountant"] == "opacus-rdp" and report["delta"] == 1e-5
    assert report["rounds_trained"] == 2 and report["steps_total"] == 190
    assert "no privacy policy" in report["policy"]["error"]
    write_policy(state, **{"epsilon-budget": 9.0})
    assert show_ledger([str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"]["epsilon-budget"] == 9.0
    assert show_ledger([str(state)]) == 0
    assert "opacus-rdp, δ=1e-05" in capsys.readouterr().out
    assert show_ledger([str(tmp_path / "none")]) == 1
    (state / LEDGER_FILE).write_text("garbage")
    assert show_ledger([str(state)]) == 1
    assert "corrupt" in capsys.readouterr().err


def test_exported_model_predicts_without_training_code(tmp_path: Path) -> None:
    """model.ts + model.json predict like the PyTorch model, without the training code."""
    cfg = RunConfig()
    model = build_model("digits", seed=3)
    export_model(ArrayRecord(model.state_dict()), cfg, tmp_path, {"round": 1})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["input_shape"] == [1, 8, 8] and len(meta["classes"]) == 10

    images, labels = _raw_digits(40)
    np.savez(tmp_path / "in.npz", x=images, y=labels)
    x, _ = load_local_arrays(str(tmp_path / "in.npz"), "digits")
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).argmax(dim=1).numpy()

    proc = subprocess.run(
        [sys.executable, "-c", PREDICT_THEN_CHECK_IMPORTS, str(tmp_path / "model.ts"),
         str(tmp_path / "in.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "index,class,name,probability"
    predicted = np.array([int(line.split(",")[1]) for line in lines[1:]])
    np.testing.assert_array_equal(predicted, expected)
    assert "# accuracy" in proc.stderr
