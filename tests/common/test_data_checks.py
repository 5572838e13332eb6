"""Bad data is refused at load, naming the file and record; a node with it refuses to train.

Every bad file is written here first, so each case fails without its check: before
the checks, NaN / inf / 1e30 / 0..255 pixels loaded silently and an empty, corrupt
or truncated file escaped as ``EOFError``, ``BadZipFile``, ``zlib.error``,
``ValueError`` or ``IndexError`` without the file's name.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

import client.app as client_app
import client.train_evaluate as client_training
from client.privacy.ledger_store import LEDGER_FILE
from common.config import RunConfig
from common.data.checks import DataFileError
from common.data.datasets import load_arrays
from common.data.local_files import load_local_arrays
from common.ledger.privacy_ledger import PrivacyLedger
from common.tasks.models import build_model
from common.wire.reply import EvaluateReport, TrainReport
from common.wire.reply_fields import Status
from server.app import make_strategy
from server.central_evaluation import CentralEvaluator
from server.federation_loop import run_rounds
from server.results.run_folder import ResultsWriter
from simulations.launch.in_process_federation import InProcessGrid
from tests.helpers.device import write_policy
from tests.helpers.messages import evaluate_message, train_message

N = 37  # records in every bad file: no reply may reveal it
BAD_AT = 23  # the record holding the bad value: stays in the node's log
HEADER = ",".join(["label"] + [f"p{i}" for i in range(64)])


def _digits(n: int = N, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images[offset : offset + n].copy(), bunch.target[offset : offset + n]


def _with_pixel(value: float) -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits()
    x[BAD_AT, 2, 5] = value
    return x, y


def _with_label(value: float) -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits()
    y = y.astype(np.float64)
    y[BAD_AT] = value
    return x, y


PIXEL = f"example {BAD_AT}, pixel (2, 5) is"  # where the log says the value is
LABEL = f"example {BAD_AT} is"
X, Y = _digits()
# (x, y, the kind of problem, what the log names besides the file)
NPZ_CASES: dict[str, tuple[np.ndarray, np.ndarray, str, str]] = {
    "nan pixel": (*_with_pixel(np.nan), "NaN or infinite", f"{PIXEL} nan"),
    "inf pixel": (*_with_pixel(np.inf), "NaN or infinite", f"{PIXEL} inf"),
    "huge pixel": (*_with_pixel(1e30), "outside 0..16", f"{PIXEL} 1e+30"),
    "negative pixel": (*_with_pixel(-3.0), "outside 0..16", f"{PIXEL} -3"),
    "0..255 scale": (X * 255 / 16, Y, "outside 0..16", "rescale to 0..16"),
    "0..1 scale": (X / 16, Y, "scaled to 0..1", "multiply by 16"),
    "string pixels": (X.astype(str), Y, "not real numbers", "dtype <U"),
    "complex pixels": (X + 1j, Y, "not real numbers", "complex"),
    "7x7 images": (np.zeros((N, 7, 7)), Y, "not shaped as", "shape (37, 7, 7)"),
    "nan label": (*_with_label(np.nan), "label is NaN", f"{LABEL} nan"),
    "inf label": (*_with_label(np.inf), "label is NaN or infinite", f"{LABEL} inf"),
    "fractional label": (*_with_label(2.5), "not an integer", f"{LABEL} 2.5"),
    "label 10": (*_with_label(10), "outside 0..9", f"{LABEL} 10"),
    "label -1": (*_with_label(-1), "outside 0..9", f"{LABEL} -1"),
    "string labels": (X, Y.astype(str), "labels are not numbers", "dtype <U"),
    "one-hot labels": (X, np.eye(10)[Y], "one number per image", "shape (37, 10)"),
    "short labels": (X, Y[:-2], "differ in number", "37 images but 35 labels"),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_values_name_the_file_record_and_rule(tmp_path: Path, case: str) -> None:
    """Each bad value is refused; the log names the record, the server's text does not."""
    x, y, problem, detail = NPZ_CASES[case]
    path = tmp_path / "shard.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataFileError) as caught:
        load_local_arrays(str(path), "digits")
    error = caught.value
    assert str(path) in str(error) and problem in str(error) and detail in str(error)
    assert re.search(r"(0\.\.16|0\.\.9)", str(error))  # says what is allowed
    public = error.public_reason
    assert "'shard.npz'" in public and problem in public and str(tmp_path) not in public
    numbers = set(re.findall(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", public))
    assert numbers <= {"0", "1", "9", "16", "8", "64"}, numbers  # the rule's numbers only


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _npz_bytes(tmp_path: Path, compressed: int = 0, keys: tuple = ("x", "y")) -> bytes:
    arrays = dict(zip(("x", "y"), _digits(200), strict=True))
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "ok.npz", **{k: arrays[k] for k in keys})
    return (tmp_path / "ok.npz").read_bytes()


def _npy_bytes(tmp_path: Path) -> bytes:
    np.save(tmp_path / "x.npy", _digits()[0])
    return (tmp_path / "x.npy").read_bytes()


def _corrupt(data: bytes, start: int, length: int) -> bytes:
    return data[:start] + bytes(length) + data[start + length :]


FILE_CASES: dict[str, tuple[str, Callable[[Path], bytes], str]] = {
    # name: (file name, its bytes, what the log names: the reader's own error)
    "empty npz": ("e.npz", lambda t: b"", "EOFError"),
    "truncated npz": ("t.npz", lambda t: _npz_bytes(t)[:700], "zipfile.BadZipFile"),
    "not a zip": ("z.npz", lambda t: b"PK\x03\x04" + b"junk" * 40, "zipfile.BadZipFile"),
    "bad CRC": ("c.npz", lambda t: _corrupt(_npz_bytes(t), 300, 40), "Bad CRC-32"),
    "bad deflate": ("d.npz", lambda t: _corrupt(_npz_bytes(t, 1), 200, 60), "zlib.error"),
    "pickled arrays": ("p.npz", lambda t: _pickled_npz(t), "allow_pickle=False"),
    "bare .npy": ("a.npz", lambda t: _npy_bytes(t), "a single .npy array"),
    "no labels": ("y.npz", lambda t: _npz_bytes(t, keys=("x",)), "lacks array 'y'"),
    "header-only csv": ("h.csv", lambda t: (HEADER + "\n").encode(), "holds no examples"),
    "header-only csv, label last": (
        "l.csv", lambda t: (",".join(f"p{i}" for i in range(64)) + ",label\n").encode(),
        "holds no examples",
    ),
    "non-numeric csv": (
        "s.csv", lambda t: (HEADER + "\n3," + ",".join(["dark"] * 64) + "\n").encode(),
        "could not convert string",
    ),
    "short csv row": (
        "r.csv", lambda t: (HEADER + "\n" + "1," * 64 + "0\n3,1,2\n").encode(),
        "number of columns changed",
    ),
    "csv narrower header": (
        "w.csv", lambda t: ("label,p0\n3," + ",".join(["1"] * 64) + "\n").encode(),
        "2 names in the header, 65 values per row",
    ),
    "csv without label": ("n.csv", lambda t: b"a,b\n1,2\n", "no 'label' column"),
    "empty csv": ("m.csv", lambda t: b"", "no 'label' column"),
    "binary csv": ("b.csv", lambda t: b"\xff\xfe\x00\x01" * 20, "UnicodeDecodeError"),
}  # fmt: skip


def _pickled_npz(tmp_path: Path) -> bytes:
    np.savez(tmp_path / "obj.npz", x=np.array([None] * 3, dtype=object), y=np.zeros(3))
    return (tmp_path / "obj.npz").read_bytes()


def test_a_missing_data_path_names_the_node_config_key(tmp_path: Path) -> None:
    """No such file (or another suffix): the path and 'data-path' are named."""
    for name in ("missing.npz", "missing.txt"):
        with pytest.raises(DataFileError, match=f"{name}: does not exist.*'data-path'"):
            load_local_arrays(str(tmp_path / name), "digits")


@pytest.mark.parametrize("case", FILE_CASES)
def test_unreadable_files_are_the_projects_error_naming_the_file(
    tmp_path: Path, case: str
) -> None:
    """Empty, corrupt, truncated or malformed files: a DataFileError, never a raw one."""
    name, content, detail = FILE_CASES[case]
    path = _write(tmp_path / name, content(tmp_path))
    with pytest.raises(DataFileError) as caught:
        load_local_arrays(str(path), "digits")
    assert str(path) in str(caught.value) and detail in str(caught.value)
    assert f"'{name}'" in caught.value.public_reason


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    """A NaN cell in a CSV is reported by its line in the file (header = line 1)."""
    x, y = _digits(5)
    rows = [HEADER] + [
        ",".join(map(str, [int(y[i]), *x[i].ravel().astype(int)])) for i in range(5)
    ]
    rows[4] = rows[4].replace(",0,", ",nan,", 1)  # record 3
    path = _write(tmp_path / "d.csv", ("\n".join(rows) + "\n").encode())
    with pytest.raises(
        DataFileError, match=r"d\.csv: a pixel is NaN.*example 3 \(line 5\)"
    ):
        load_local_arrays(str(path), "digits")


def _idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    dims = array.shape
    raw = struct.pack(f">4B{len(dims)}I", 0, 0, 8, len(dims), *dims)
    data = raw + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _idx_dir(folder: Path, x: np.ndarray, y: np.ndarray, prefix: str = "train") -> Path:
    folder.mkdir(exist_ok=True)
    _idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
    _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


def test_idx_directory_checks_name_the_idx_file(tmp_path: Path) -> None:
    """A node's IDX folder: bad labels, wrong sides and corrupt gzip name the file."""
    x, y = _digits()
    x = x.astype(np.uint8)
    labels = y.copy()
    labels[BAD_AT] = 12
    folder = _idx_dir(tmp_path / "a", x, labels)
    with pytest.raises(
        DataFileError,
        match=rf"labels-idx1-ubyte.gz: labels lie outside 0..9 \({LABEL} 12\)",
    ):
        load_local_arrays(str(folder), "digits")
    folder = _idx_dir(tmp_path / "b", np.zeros((N, 7, 7)), y)
    with pytest.raises(
        DataFileError, match="train-images-idx3-ubyte.gz: images are not shaped"
    ):
        load_local_arrays(str(folder), "digits")
    folder = _idx_dir(tmp_path / "c", x, y)
    image_file = folder / "train-images-idx3-ubyte.gz"
    image_file.write_bytes(_corrupt(image_file.read_bytes(), 30, 40))  # zlib.error before
    with pytest.raises(
        DataFileError, match="train-images-idx3-ubyte.gz: cannot read IDX file"
    ):
        load_local_arrays(str(folder), "digits")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileError, match="train-labels-idx1-ubyte.gz: is missing"):
        load_local_arrays(str(folder), "digits")  # fmt: skip


def test_server_idx_dataset_is_checked_too(tmp_path: Path) -> None:
    """The server's Fashion-MNIST / MNIST files go through the same checks."""
    x = np.zeros((4, 28, 28), dtype=np.uint8)
    folder = _idx_dir(tmp_path, x, np.array([0, 1, 2, 3]))
    _idx_dir(folder, x, np.array([0, 1, 10, 3]), prefix="t10k")
    with pytest.raises(
        DataFileError, match="t10k-labels-idx1-ubyte.gz: labels lie outside 0..9"
    ):
        load_arrays("mnist", str(folder), 0)
    _idx_dir(folder, x[:3], np.array([0, 1, 2, 3]), prefix="t10k")
    with pytest.raises(
        DataFileError, match="t10k-labels-idx1-ubyte.gz: images and labels differ"
    ):
        load_arrays("mnist", str(folder), 0)  # fmt: skip


def test_embedded_digits_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even scikit-learn's digits pass the checks: a NaN there would be refused."""
    import common.tasks.digits as digits

    x, y = _with_pixel(np.nan)
    monkeypatch.setattr(digits, "load_digits_file", lambda path: (x, y))
    with pytest.raises(DataFileError, match=r"digits\.csv\.gz: a pixel is NaN"):
        load_arrays("digits", "", 0)


# --- a node with bad data refuses, spends nothing, and the run goes on ------------------


def _node(tmp_path: Path, name: str, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    state = write_policy(tmp_path / name)
    return {"data-path": str(tmp_path / f"{name}.npz"), "state-dir": str(state)}


def _context(cfg: RunConfig, node: dict[str, str], node_id: int) -> Context:
    return Context(run_id=7, node_id=node_id, node_config=node, state=RecordDict(),
                   run_config=cfg.to_run_config())  # fmt: skip


def test_node_with_nan_pixels_replies_data_error_and_spends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data-error, naming the file and the problem, before the ledger is even read."""
    cfg = RunConfig(
        num_rounds=2, target_epsilon=4.0, fraction_evaluate=1.0, local_test_fraction=0.2
    )
    node = _node(tmp_path, "bad", *_with_pixel(np.nan))
    spent = PrivacyLedger("rdp", 1e-5).extended(1, 1.0, 0.1, 10, run_id=3).to_json()
    (Path(node["state-dir"]) / LEDGER_FILE).write_text(spent)

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("the ledger was read or the node trained")

    monkeypatch.setattr(client_training, "load_ledger", forbidden)
    monkeypatch.setattr(client_training, "train_private", forbidden)
    arrays = ArrayRecord(build_model("digits", seed=0).state_dict())
    reply = client_app.train(train_message(arrays, 1), _context(cfg, node, 9))
    assert not reply.has_error() and "arrays" not in reply.content.array_records
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.DATA_ERROR and report.partition_id == -1
    assert report.status.counter == "failed" and not report.status.refused
    reason = str(report.reason)
    assert "'bad.npz'" in reason and "NaN or infinite" in reason and "0..16" in reason
    assert (
        str(tmp_path) not in reason and str(BAD_AT) not in reason and str(N) not in reason
    )
    assert (Path(node["state-dir"]) / LEDGER_FILE).read_text() == spent  # untouched

    evaluation = EvaluateReport.from_content(
        client_app.evaluate(evaluate_message(arrays, 1), _context(cfg, node, 9)).content
    )
    assert evaluation.status is Status.DATA_ERROR and evaluation.reason == reason


def test_run_goes_on_without_the_node_with_bad_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server loop with three devices, one with NaN pixels, over two rounds.

    The bad node replies data-error each round and is counted as failed; the other
    two train, the global model stays finite, and each good node's ε is its own
    two-round ledger, counted once (no round twice, none from the bad node).
    """
    cfg = RunConfig(
        num_rounds=2, target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=50.0,
        min_available_nodes=3, min_train_nodes=1, results_dir=str(tmp_path / "results"),
    )  # fmt: skip
    nodes = {
        11: _node(tmp_path, "good-a", *_digits(300)),
        12: _node(tmp_path, "good-b", *_digits(300, offset=300)),
        13: _node(tmp_path, "nan", *_with_pixel(np.nan)),
    }
    for key, value in {"_run_id": 7, "_node_id": 1, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, key, value)  # as the ServerApp process has
    grid: Any = InProcessGrid({n: _context(cfg, node, n) for n, node in nodes.items()})
    initial = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
    writer = ResultsWriter(tmp_path / "results", cfg)
    evaluator = CentralEvaluator(cfg)
    result = run_rounds(grid, cfg, make_strategy(cfg), initial, evaluator, writer, 0.0)
    assert result.rounds_completed == 2 and result.stop_reason.startswith("completed")
    weights = result.arrays.to_torch_state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights)

    lines = (tmp_path / "results" / "rounds.jsonl").read_text().splitlines()
    rounds = [json.loads(line) for line in lines]
    for record in rounds:
        assert (record["clients_trained"], record["clients_failed"]) == (2, 1)
        clients = {c["node_id"]: c for c in record["clients"]}
        assert clients[13]["status"] == "data-error"
        assert "'nan.npz'" in clients[13]["reason"]
        assert math.isfinite(record["central"]["loss"])
    assert result.state.failures == 2 and 13 not in result.state.latest
    assert not (tmp_path / "nan" / LEDGER_FILE).exists()

    # Each good node's ε: its own ledger, one entry per round, recomputed independently.
    for node_id in (11, 12):
        ledger_file = Path(nodes[node_id]["state-dir"]) / LEDGER_FILE
        on_disk = PrivacyLedger.from_json(ledger_file.read_text())
        assert on_disk.rounds == (1, 2)
        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in clients[node_id]["history"]]
        assert accountant.history == list(on_disk.history())
        assert clients[node_id]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert rounds[-1]["max_epsilon"] == pytest.approx(
        max(clients[n]["epsilon"] for n in (11, 12))
    )
