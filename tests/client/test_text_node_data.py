"""A text task's deployed node reads its own CSV of texts as its ``data-path``.

Same columns and label values as the task's CSV, tokenised by the task's tokenizer,
same refusals naming file and row; a train message on such a node trains and caches
its shard in the node's state folder. A tiny random BERT stands in for MiniLM.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from flwr.app import ArrayRecord  # noqa: E402

import client.app as client_app  # noqa: E402
from client.data.shard_cache import CACHE_DIR  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data.checks import DataFileError  # noqa: E402
from common.data.local_files import load_local_arrays, local_sources  # noqa: E402
from common.tasks.models import build_run_model  # noqa: E402
from common.tasks.text import EncoderFiles, TextCsv, tokenised  # noqa: E402
from common.wire.reply import TrainReport  # noqa: E402
from common.wire.reply_fields import Status  # noqa: E402
from tests.helpers.device import device_context, write_policy  # noqa: E402
from tests.helpers.messages import train_message  # noqa: E402
from tests.helpers.tiny_text import (  # noqa: E402
    MAX_LENGTH,
    importable_tiny_task,
    write_corpus,
)

MODULE = "tiny_text_node"  # its own name: other test files import a tiny_text too
TASK = f"{MODULE}:TASK"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny task importable as ``tiny_text_node:TASK``; yields its encoder."""
    root = tmp_path_factory.mktemp("tiny-text-node")
    with importable_tiny_task(root, MODULE, "server.csv") as folder:
        yield folder


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_a_text_csv_is_tokenised_like_the_servers_data(
    encoder: Path, tmp_path: Path
) -> None:
    path = write_corpus(tmp_path / "mine.csv", rows=40, seed=7)
    x, y = load_local_arrays(str(path), TASK)
    ids, labels, _ = tokenised(
        path, TextCsv(str(path), ("neg", "pos")), EncoderFiles(str(encoder)), MAX_LENGTH
    )
    assert x.dtype == np.float32 and x.shape == (40, MAX_LENGTH)
    np.testing.assert_array_equal(x, ids.astype(np.float32))
    np.testing.assert_array_equal(y, labels)
    assert y.tolist() == [0, 1] * 20  # 'neg', 'pos' in the task's class order
    assert (x[:, 0] == 2).all()  # [CLS]: the task's own tokenizer
    # The tokenizer's files shape the shard: they are part of its cache key.
    names = {p.name for p in local_sources(str(path), TASK)}
    assert {"mine.csv", "vocab.txt", "tokenizer.json", "config.json"} <= names


@pytest.mark.parametrize(
    ("rows", "problem", "where"),
    [
        ([["pos", "good"], ["neg", "  "]], "a text is empty", "row 2 (line 2)"),
        ([["pos", "good"], ["positive", "fine"]], "outside the classes", "row 2"),
        ([["pos", "good"], ["neg"]], "too few columns", "row 2 (line 2)"),
    ],
)
def test_a_bad_row_is_refused_naming_file_and_row(
    encoder: Path, tmp_path: Path, rows: list, problem: str, where: str
) -> None:
    path = _write(tmp_path / f"bad-{len(problem)}.csv", rows)
    with pytest.raises(DataFileError) as info:
        load_local_arrays(str(path), TASK)
    assert info.value.source == path and problem in str(info.value)
    assert where in str(info.value)


def test_a_missing_text_csv_names_the_rule(encoder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="'data-path' of a text task") as info:
        load_local_arrays(str(tmp_path / "absent.csv"), TASK)
    assert "'neg', 'pos'" in str(info.value)


def test_a_node_with_its_own_texts_trains(encoder: Path, tmp_path: Path) -> None:
    """A train message on a node whose data-path is a text CSV trains on it, caches
    the tokenised shard, and a bad CSV is a data error naming the file only."""
    cfg = RunConfig(
        task=TASK, grad_sample_mode="hooks", batch_size=16, lora_rank=4,
        lora_alpha=8.0, lora_target_modules="query,value", update_compression="none",
        target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=50.0, num_rounds=2,
    )  # fmt: skip
    arrays = ArrayRecord(build_run_model(cfg, seed=0).state_dict())
    state = write_policy(tmp_path / "state")
    data = write_corpus(tmp_path / "node.csv", rows=60, seed=3)
    reply = client_app.train(train_message(arrays, 1), device_context(cfg, data, state))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.TRAINED, report.reason
    assert (state / CACHE_DIR).is_dir()

    bad = _write(tmp_path / "broken.csv", [["pos", "good"], ["neg", ""]])
    other = write_policy(tmp_path / "other")
    reply = client_app.train(train_message(arrays, 1), device_context(cfg, bad, other))
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.DATA_ERROR
    assert "broken.csv" in str(report.reason) and "a text is empty" in str(report.reason)
    assert str(tmp_path) not in str(report.reason)  # the path and row stay local
