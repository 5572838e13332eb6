"""A text model's export predicts on raw text: the tokenizer beside model.ts, latency.

A tiny random BERT (tests/helpers/tiny_text.py) with random adapters and head is
exported as a run would; ``client.predict`` then reads a CSV of raw texts in a fresh
process that must not import the training code, and must print what the in-process
model predicts on the training tokenisation of the same texts.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from flwr.app import ArrayRecord  # noqa: E402

from client.predict import main as predict_main  # noqa: E402
from client.predict_text import text_input  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.tasks.models import build_run_model  # noqa: E402
from common.tasks.text import EncoderFiles, TextCsv, tokenised  # noqa: E402
from server.export.compression import compress  # noqa: E402
from server.export.torchscript import export_model  # noqa: E402
from tests.helpers.device import PREDICT_THEN_CHECK_IMPORTS  # noqa: E402
from tests.helpers.tiny_text import MAX_LENGTH, importable_tiny_task  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE = "tiny_text_predict"  # its own name: other test files import a tiny_text too
TEXTS = [
    ("negative", "The plot was DULL, boring and very weak!"),
    ("1", "a lovely, warm film"),
    ("positive", "great " * 30 + "fun"),  # longer than max_length: truncated
    ("0", "awful cast ; tedious story"),
    ("negative", "unknownword and poor"),
    ("1", "superb   brilliant\tmovie"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An exported tiny text model (float32 and int8) and the model it came from."""
    root = tmp_path_factory.mktemp("tiny-text-predict")
    with importable_tiny_task(root, MODULE, "texts.csv") as encoder:
        cfg = RunConfig(
            task=f"{MODULE}:TASK", grad_sample_mode="hooks", lora_rank=4,
            lora_alpha=8.0, lora_target_modules="query,value", export_compression="int8",
        )  # fmt: skip
        model = build_run_model(cfg, seed=1).eval()
        ids = _training_ids(encoder, root / "as-trained.csv")
        torch.manual_seed(5)
        with torch.no_grad():  # adapters and head away from their initial values
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.5)
            # Centre the head on these texts' features, so that predictions differ.
            features = model.pooled(torch.from_numpy(ids.astype(np.float32)))
            model.head.bias -= model.head(features).mean(0)
        out = root / "export"
        out.mkdir()
        export_model(ArrayRecord(model.state_dict()), cfg, out, {"round": 1})
        yield {"out": out, "model": model, "ids": ids}


def _write_texts(path: Path, rows: list[tuple[str, str]], header=("label", "text")):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _training_ids(encoder: Path, path: Path) -> np.ndarray:
    """The ids the training code makes of TEXTS (its own CSV layout and tokeniser)."""
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("pos", text) for _, text in TEXTS])
    source = TextCsv(str(path), ("neg", "pos"))
    ids, _, truncated = tokenised(path, source, EncoderFiles(str(encoder)), MAX_LENGTH)
    assert truncated == 1
    return ids


def test_model_json_records_tokenizer_and_latency(exported: dict) -> None:
    import hashlib

    out = exported["out"]
    meta = json.loads((out / "model.json").read_text())
    entry = meta["tokenizer"]
    assert entry["file"] == "tokenizer.json"
    assert (
        entry["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert (entry["max_length"], entry["pad_id"], entry["pad_token"]) == (
        MAX_LENGTH, 0, "[PAD]",
    )  # fmt: skip
    assert set(meta["variants"]) == {"float32", "int8"}
    for variant in meta["variants"].values():
        assert 0 < variant["latency_ms_per_example"] < 10_000
    method = meta["latency"]
    assert (method["batch"], method["threads"]) == (1, 1)
    assert "median" in method["statistic"]


def test_device_tokenisation_is_the_training_tokenisation(exported: dict) -> None:
    meta = json.loads((exported["out"] / "model.json").read_text())
    ids = text_input(exported["out"] / "model.ts", meta["tokenizer"], [t for _, t in TEXTS])
    expected = exported["ids"]
    assert ids.dtype == np.float32 and ids.shape == (len(TEXTS), MAX_LENGTH)
    np.testing.assert_array_equal(ids, expected.astype(np.float32))


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_predict_on_raw_text_equals_the_in_process_model(
    exported: dict, tmp_path: Path, variant: str
) -> None:
    """Predictions from a fresh process (no training code) equal the model's own."""
    x = torch.from_numpy(exported["ids"].astype(np.float32))
    merged = exported["model"].export_module()
    eager = merged if variant == "float32" else compress(merged, "int8")
    with torch.no_grad():
        logits = eager(x)
    expected = logits.argmax(1).numpy()
    assert set(expected) == {0, 1}  # the check can tell texts apart
    probs = torch.softmax(logits, 1).max(1).values.numpy()
    labels = np.array([0, 1, 1, 0, 0, 1])
    texts = _write_texts(tmp_path / "texts.csv", TEXTS)
    file = "model.ts" if variant == "float32" else "model-int8.ts"
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT_THEN_CHECK_IMPORTS,
         str(exported["out"] / file), str(texts)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "index,class,name,probability"
    rows = [line.split(",") for line in lines[1:]]
    np.testing.assert_array_equal([int(r[1]) for r in rows], expected)
    assert [r[2] for r in rows] == [("negative", "positive")[c] for c in expected]
    np.testing.assert_allclose([float(r[3]) for r in rows], probs, atol=2e-4)
    assert f"# model {variant}" in proc.stderr
    accuracy = (expected == labels).mean()
    assert f"# accuracy {accuracy:.4f} on {len(TEXTS)} labelled examples" in proc.stderr


def test_texts_without_labels_predict_without_accuracy(
    exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = _write_texts(
        tmp_path / "t.csv", [("x", "good film"), ("y", "bad film")], ("id", "text")
    )
    assert predict_main([str(exported["out"] / "model.ts"), str(texts)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 3
    assert "# accuracy" not in captured.err


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (("label", "sentence"), [("0", "good")], "the header has no 'text' column"),
        (
            ("label", "text"),
            [("0", "good"), ("1", "  ")],
            "row 2 (line 3), column 'text': the text is empty",
        ),
        (
            ("label", "text"),
            [("maybe", "good")],
            "row 1 (line 2), column 'label': unknown label 'maybe'",
        ),
        (("label", "text"), [("2", "good")], "unknown label '2'"),
        (("text", "label"), [("good",)], "row 1 (line 2): 1 columns"),
    ],
)
def test_bad_text_csv_is_refused_naming_file_row_and_column(
    exported: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    header: tuple[str, ...],
    rows: list,
    message: str,
) -> None:
    texts = _write_texts(tmp_path / "bad.csv", rows, header)
    assert predict_main([str(exported["out"] / "model.ts"), str(texts)]) == 1
    err = capsys.readouterr().err
    assert str(texts) in err and message in err


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_missing_or_altered_tokenizer_is_refused(
    exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    copy = tmp_path / "export"
    shutil.copytree(exported["out"], copy)
    tokenizer = copy / "tokenizer.json"
    if damage == "missing":
        tokenizer.unlink()
    else:
        tokenizer.write_text(tokenizer.read_text().replace("[UNK]", "[UNX]"))
    texts = _write_texts(tmp_path / "t.csv", [("0", "good film")])
    assert predict_main([str(copy / "model.ts"), str(texts)]) == 1
    err = capsys.readouterr().err
    expected = "is missing" if damage == "missing" else "does not match the SHA-256"
    assert str(tokenizer) in err and f"tokenizer file {expected}" in err
