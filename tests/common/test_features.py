"""ScatterNet features: equal to kymatio's transform, per image, exported with the model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from common.config import ConfigError, RunConfig
from common.data.features import SCATTERING_SHAPE, ScatteringFront, compute_features
from common.tasks.fashion_mnist import DEFAULT_DIR as DEFAULT_FASHION_MNIST_DIR
from common.tasks.models import build_model, count_parameters
from common.tasks.registry import get_task
from server.export import torchscript
from server.export.torchscript import export_model
from simulations.launch.options import add_run_options, build_overrides, resolve_clients
from simulations.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_scattering_equals_kymatio_then_group_norm() -> None:
    """Same coefficients as kymatio's own ScatteringTorch2D (stable modulus), 27 groups."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    x = _images(6)
    reference = F.group_norm(ScatteringTorch2D(J=2, shape=(28, 28), L=8)(x[:, 0]), 27)
    features = compute_features("scattering", x)
    assert features.shape == (6, *SCATTERING_SHAPE)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)


def test_features_of_an_image_do_not_depend_on_the_rest_of_the_batch() -> None:
    """Per-image normalisation: no statistic is shared across examples (no privacy cost)."""
    x = _images(5)
    together = compute_features("scattering", x)
    alone = torch.cat([compute_features("scattering", x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    per_group = together.reshape(5, 27, -1)
    torch.testing.assert_close(per_group.mean(-1), torch.zeros(5, 27), atol=1e-4, rtol=0)


def test_the_front_has_no_weights_to_send_or_train() -> None:
    """The wavelet filters are fixed: no parameters, nothing in the state dict."""
    front = ScatteringFront()
    assert list(front.parameters()) == [] and front.state_dict() == {}
    model = build_model("fashion-mnist", features="scattering")
    assert count_parameters(model) == 81 * 7 * 7 * 10 + 10


def test_bad_inputs_name_the_key() -> None:
    """Digits are 8x8: the config is refused; a wrong tensor shape is refused too."""
    with pytest.raises(ConfigError, match="'features' and 'task'"):
        RunConfig(task="digits", features="scattering")
    with pytest.raises(ConfigError, match="'features'"):
        RunConfig(task="fashion-mnist", features="wavelets")
    with pytest.raises(ValueError, match="needs 28x28 images"):
        compute_features("scattering", torch.zeros(2, 1, 8, 8))
    assert compute_features("scattering", torch.zeros(0, 1, 28, 28)).shape == (0, 81, 7, 7)


def test_exported_model_takes_raw_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.ts includes the scattering front: client.predict needs no privfed code."""

    # The export scores each saved variant on the server's test set through the
    # traced scattering front: 15 s for all 10,000 images. Nothing here reads that
    # score, so it is taken on the first 256 real test images.
    def first_test_images(name: str, data_dir: str, seed: int) -> tuple[Any, Any]:
        task = get_task(name)
        x, y = task.raw("test", data_dir, seed)
        return task.preprocess(x[:256]), y[:256]

    monkeypatch.setattr(torchscript, "load_test_split", first_test_images)
    cfg = RunConfig(task="fashion-mnist", features="scattering")
    model = build_model("fashion-mnist", seed=4, features="scattering").eval()
    export_model(ArrayRecord(model.state_dict()), cfg, tmp_path, {"round": 1})
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["features"] == "scattering" and meta["input_shape"] == [1, 28, 28]

    raw = np.random.default_rng(0).integers(0, 256, (7, 784)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=raw)
    norm = meta["preprocessing"]
    assert norm["kind"] == "image"
    x = torch.from_numpy((raw / norm["pixel_scale"] - norm["mean"]) / norm["std"])
    with torch.no_grad():
        expected = model(compute_features("scattering", x.reshape(7, 1, 28, 28)))
    out = subprocess.run(
        [sys.executable, "-m", "client.predict", str(tmp_path / "model.ts"),
         str(tmp_path / "x.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    predicted = [int(line.split(",")[1]) for line in out.splitlines()[1:8]]
    assert predicted == expected.argmax(1).tolist()
    traced = torch.jit.load(str(tmp_path / "model.ts"))  # traced at batch 2
    for batch in (1, 3):
        torch.testing.assert_close(
            traced(x[:batch].reshape(batch, 1, 28, 28)),
            expected[:batch],
            atol=1e-4,
            rtol=1e-4,
        )


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_options(p, "nodes")
    return resolve_clients(p.parse_args(list(argv)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name: str, tmp_path: Path) -> None:
    """Every preset passes validation; explicit options override single keys."""
    preset = PRESETS[name].run_config
    cfg = RunConfig(**{k.replace("-", "_"): v for k, v in preset.items()})
    assert cfg.target_epsilon == preset["target-epsilon"]
    assert cfg.features == preset.get("features", "pixels")
    args = _parse("--preset", name, "--rounds", "3", "--results-dir", str(tmp_path / "r"))
    try:
        overrides = build_overrides(args)
    except ConfigError as exc:  # the IDX files are not on this machine
        pytest.skip(str(exc))
    assert overrides["num-rounds"] == 3
    assert overrides["batch-size"] == preset["batch-size"]
    assert overrides["min-available-nodes"] == (PRESETS[name].clients or 10)
    assert overrides.get("partitioner") == preset.get("partitioner")
    assert overrides["target-epsilon"] == preset["target-epsilon"]


def test_non_private_preset_run_clears_the_epsilon_target(tmp_path: Path) -> None:
    """--preset … --privacy-mode none leaves no stale ε target in the run config."""
    args = _parse("--preset", "fmnist-eps3", "--privacy-mode", "none",
                  "--results-dir", str(tmp_path / "r"))  # fmt: skip
    try:
        overrides = build_overrides(args)
    except ConfigError as exc:  # the IDX files are not on this machine
        pytest.skip(str(exc))
    assert overrides["privacy-mode"] == "none" and overrides["target-epsilon"] == 0.0


def test_unknown_preset_is_refused_with_the_choices() -> None:
    """argparse names the allowed presets."""
    with pytest.raises(SystemExit):
        _parse("--preset", "fastest")


@pytest.mark.skipif(
    not DEFAULT_FASHION_MNIST_DIR.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
def test_client_trains_the_linear_model_on_its_shard_features() -> None:
    """A scattering client round: the shard becomes features once, DP-SGD trains, ε > 0."""
    import client.app as client_app
    from common.wire.reply import TrainReport
    from common.wire.reply_fields import Status
    from tests.helpers.messages import make_context, train_message

    cfg = RunConfig(
        task="fashion-mnist", features="scattering", batch_size=128,
        target_epsilon=3.0, num_rounds=2, max_grad_norm=0.1, learning_rate=4.0,
        update_compression="none",  # the float32 weights are read below
    )  # fmt: skip
    model = build_model("fashion-mnist", seed=0, features="scattering")
    context = make_context(cfg, partition_id=3, num_partitions=60)
    reply = client_app.train(train_message(ArrayRecord(model.state_dict()), 1), context)
    report = TrainReport.from_content(reply.content)
    assert report.status is Status.TRAINED and report.ledger is not None
    # 1,000 records (all train: local-test-fraction 0), B 128: q = 1/8, 8 steps
    assert report.ledger.history() == [
        (report.ledger.entries[0].noise_multiplier, 1 / 8, 8)
    ]
    assert 0 < report.ledger.epsilon() < 3.0
    new = reply.content["arrays"].to_torch_state_dict()
    assert set(new) == set(model.state_dict())
    assert not torch.equal(
        new["classifier.1.weight"], model.state_dict()["classifier.1.weight"]
    )
