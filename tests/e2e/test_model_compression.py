"""Compressed exports: what model.json claims about each variant holds for the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from client.predict import main as predict_main
from common.config import RunConfig
from common.data.datasets import load_dataset, normalisation
from common.data.features import ScatteringFront
from common.tasks.models import build_model
from server.export.compression import (
    PRUNE_AMOUNT,
    VARIANT_FILES,
    Int8WeightConv2d,
    ScriptedScattering,
    compress,
    script_variant,
)
from server.export.torchscript import export_model
from tests.helpers.device import PREDICT_THEN_CHECK_IMPORTS

REPO = Path(__file__).resolve().parents[2]
# torch 2.13 flags TorchScript and quantised tensors as deprecated; that is known
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")


def _trained_digits_mlp() -> torch.nn.Module:
    """A digits MLP trained for a second, so that agreement and accuracy mean something."""
    data = load_dataset("digits", "", 42)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model = build_model("digits", seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One export folder per compression method, from the same trained weights."""
    weights = ArrayRecord(_trained_digits_mlp().state_dict())
    folders = {}
    for method in ("int8", "int8+prune"):
        folder = tmp_path_factory.mktemp(method.replace("+", "-"))
        export_model(weights, RunConfig(export_compression=method), folder, {"round": 1})
        folders[method] = folder
    data = load_dataset("digits", "", 42)
    scale, mean, std = normalisation("digits")
    raw = np.rint((data.x_test[:, 0] * std + mean) * scale).astype(np.uint8)
    np.savez(folders["int8"].parent / "test.npz", x=raw, y=data.y_test)
    return folders


@pytest.fixture(scope="module")
def float32_classes(digits_exports: dict[str, Path]) -> np.ndarray:
    """What client.predict says with model.ts (the same weights in every folder)."""
    folder = digits_exports["int8"]
    classes, stderr = _predict(folder / "model.ts", folder.parent / "test.npz")
    assert "# model float32 (model.ts)" in stderr
    return classes


def _predict(model_file: Path, images: Path) -> tuple[np.ndarray, str]:
    """Run client.predict in a fresh process that must not import the training code."""
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT_THEN_CHECK_IMPORTS, str(model_file), str(images)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "index,class,name,probability"
    return np.array([int(line.split(",")[1]) for line in lines[1:]]), proc.stderr


@pytest.mark.parametrize("method", ["int8", "int8+prune"])
def test_variant_predicts_and_its_accuracy_is_what_predict_gets(
    digits_exports: dict[str, Path], float32_classes: np.ndarray, method: str
) -> None:
    """Each variant runs in a fresh predict process, names itself, scores as recorded."""
    folder = digits_exports[method]
    images = folder.parent / "test.npz"
    meta = json.loads((folder / "model.json").read_text())
    assert meta["export_compression"] == method
    assert set(meta["variants"]) == {"float32", method}
    reference = float32_classes
    predicted, stderr = _predict(folder / VARIANT_FILES[method], images)
    assert f"# model {method} ({VARIANT_FILES[method]})" in stderr
    assert "deprecated" not in stderr and "Warning" not in stderr
    labels = np.load(images)["y"]
    for name, classes in (("float32", reference), (method, predicted)):
        entry = meta["variants"][name]
        assert entry["test_examples"] == len(labels)
        assert float((classes == labels).mean()) == pytest.approx(
            entry["accuracy"], abs=1e-12
        )
    change = 100 * (
        meta["variants"][method]["accuracy"] - meta["variants"]["float32"]["accuracy"]
    )
    assert meta["variants"][method]["accuracy_change_points"] == pytest.approx(
        change, abs=1e-3
    )
    if method == "int8":
        assert (predicted == reference).mean() >= 0.99
    else:  # pruning half of a 4,810-weight MLP costs accuracy; the record says how much
        assert meta["variants"][method]["accuracy"] > 0.8


@pytest.mark.parametrize("method", ["int8", "int8+prune"])
def test_recorded_size_and_sparsity_hold_for_the_file(
    digits_exports: dict[str, Path], method: str
) -> None:
    """Bytes and size factor are those of the files; the stored int8 weights are as sparse
    as claimed (pruned: at least PRUNE_AMOUNT of every layer)."""
    folder = digits_exports[method]
    variants = json.loads((folder / "model.json").read_text())["variants"]
    entry = variants[method]
    for name in ("float32", method):
        assert variants[name]["bytes"] == (folder / VARIANT_FILES[name]).stat().st_size
    assert entry["bytes"] < variants["float32"]["bytes"]
    assert entry["size_factor"] == pytest.approx(
        variants["float32"]["bytes"] / entry["bytes"], abs=1e-4
    )
    torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.qint8)  # spend the notice
    loaded = torch.jit.load(str(folder / VARIANT_FILES[method]))
    zeros = total = 0
    for module in loaded.modules():
        if module.original_name == "LinearPackedParams":
            weight = module._weight_bias()[0]
            assert weight.dtype == torch.qint8
            layer_zeros = int((weight.int_repr() == 0).sum())
            if method == "int8+prune":
                assert layer_zeros >= PRUNE_AMOUNT * weight.numel()
            zeros, total = zeros + layer_zeros, total + weight.numel()
    assert total == 64 * 64 + 64 * 10
    assert entry["weight_sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert entry["parameters"] == 4810


def test_predict_refuses_a_file_model_json_does_not_describe(
    digits_exports: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A model file missing from model.json fails, naming the file and what is listed."""
    folder = digits_exports["int8"]
    stray = folder / "model-int8-pruned.ts"
    stray.write_bytes((folder / "model-int8.ts").read_bytes())
    try:
        code = predict_main([str(stray), str(folder.parent / "test.npz")])
    finally:
        stray.unlink()
    err = capsys.readouterr().err
    assert code == 1
    assert "'model-int8-pruned.ts'" in err and "describes: model.ts, model-int8.ts" in err


def test_compressed_cnn_stores_int8_convolutions() -> None:
    """The tanh CNN's Conv2d weights are stored int8 and still compute the convolution."""
    model = build_model("fashion-mnist", seed=1).eval()
    compressed = compress(model, "int8")
    convs = [m for m in compressed.modules() if isinstance(m, Int8WeightConv2d)]
    assert len(convs) == 2 and all(c.weight_int8.dtype == torch.int8 for c in convs)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in compressed.modules())
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected = model.features[0](x)
        got = convs[0](x)
        scripted = script_variant(compressed, None)
        torch.testing.assert_close(scripted(x), compressed(x))
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    with pytest.raises(ValueError, match="'export-compression'.*allowed: 'int8'"):
        compress(model, "none")


def test_scripted_scattering_equals_kymatio() -> None:
    """The scripted port gives kymatio's coefficients (float32 filters: to rounding;
    float16 filters: close), for one image and across a chunk boundary."""
    front = ScatteringFront(28)
    exact = torch.jit.script(ScriptedScattering(front, torch.float32))
    half = torch.jit.script(ScriptedScattering(front, torch.float16))
    assert half.psi.dtype == torch.float16
    x = torch.randn(37, 1, 28, 28)
    with torch.no_grad():
        expected = front(x)
        for batch in (x[:1], x):
            torch.testing.assert_close(
                exact(batch), expected[: len(batch)], atol=1e-4, rtol=0
            )
        assert (half(x) - expected).abs().max() < 0.02


@pytest.mark.e2e
def test_preset_model_compresses_past_target(tmp_path: Path) -> None:
    """The ScatterNet model's int8 file is >= 3.5x smaller than model.ts (full test set)."""
    cfg = RunConfig(task="fashion-mnist", features="scattering")
    model = build_model("fashion-mnist", seed=2, features="scattering")
    export_model(ArrayRecord(model.state_dict()), cfg, tmp_path, {})
    entry = json.loads((tmp_path / "model.json").read_text())["variants"]["int8"]
    assert entry["size_factor"] >= 3.5
    assert "wavelet filters float16" in entry["dtype"]


@pytest.mark.e2e
def test_compression_benchmark_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end on the digits MLP and the tanh CNN (no timing)."""
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.bench.export_compression",
         "--out", str(tmp_path),
         "--cnn-examples", "500", "--cnn-epochs", "1", "--single-repeats", "2",
         "--batch-repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["model"], r["variant"]) for r in rows} == {
        (model, variant)
        for model in ("digits MLP", "tanh CNN")
        for variant in ("float32", "int8", "int8+prune")
    }
    assert "| tanh CNN | int8 |" in proc.stdout
