"""The task API for tasks written outside the package (docs/tasks.md).

A task named ``module:attribute`` goes through the same code as the built-ins; one
that cannot be used is refused when the run config is parsed, naming the module,
the attribute and the part; a model a DP gradient path cannot train is refused
before round 1; natural sites partition a federation by institution; the export's
preprocessing description is what ``client.predict`` applies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.predict import model_input
from common.config import ConfigError, RunConfig
from common.data.datasets import load_arrays
from common.data.partitioning import PartitionError, PartitionSpec, partition_indices
from common.run_keys import check_key
from common.tasks.model_checks import check_task_model, private_model_problem
from common.tasks.preprocessing import (
    AffinePreprocessing,
    CallablePreprocessing,
    ImagePreprocessing,
)
from common.tasks.registry import get_task, load_task_reference

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "simulations" / "examples" / "my_task.py"

GOOD = """
from common.tasks.task import AffinePreprocessing, Task
import numpy as np

def read(task, data_dir, seed, part):
    rng = np.random.default_rng([seed, part == "train"])
    n = 40 if part == "train" else 12
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] > 0).astype(int)
    sites = np.array(["north", "south", "east"] * 14)[:n]
    return (x, y, sites) if part == "train" else (x, y)

def model(num_classes, features):
    from torch import nn
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, num_classes))

def bn_model(num_classes, features):
    from torch import nn
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))

def lstm_free_but_direct_unsupported(num_classes, features):
    from torch import nn
    return nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, num_classes))

def make():
    return TASK

TASK = Task(name="toy", class_labels=("no", "yes"), read_raw=read, model=model,
            preprocessing=AffinePreprocessing(raw_shape=(3,)), natural_sites=True)
BN = Task(name="toy-bn", class_labels=("no", "yes"), read_raw=read, model=bn_model,
          preprocessing=AffinePreprocessing(raw_shape=(3,)))
NORM = Task(name="toy-ln", class_labels=("no", "yes"), read_raw=read,
            model=lstm_free_but_direct_unsupported,
            preprocessing=AffinePreprocessing(raw_shape=(3,)))
NOT_A_TASK = {"name": "x", "model": model}
"""


@pytest.fixture
def toy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Task modules on sys.path, as PYTHONPATH would put them; forgotten afterwards."""
    (tmp_path / "toy_tasks.py").write_text(GOOD)
    (tmp_path / "broken_tasks.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "half_tasks.py").write_text(
        "from common.tasks.task import Task\n"
        "TASK = Task(name='half', class_labels=('a', 'b'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    load_task_reference.cache_clear()
    yield "toy_tasks"
    load_task_reference.cache_clear()
    for name in ("toy_tasks", "broken_tasks", "half_tasks"):
        sys.modules.pop(name, None)


def test_a_reference_is_a_task_everywhere(toy_module: str) -> None:
    """``module:attribute`` (a Task or a callable returning one) works as a built-in."""
    cfg = RunConfig(task="toy_tasks:TASK", partitioner="sites", classes_per_client=2)
    assert get_task("toy_tasks:make") is get_task(cfg.task)
    data = load_arrays(cfg.task, "", 0)
    assert data.x_train.shape == (40, 3) and data.x_train.dtype == np.float32
    assert data.num_classes == 2 and data.sites_train is not None
    check_task_model(cfg)  # Linear layers: every path can train it


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (
            "broken_tasks:TASK",
            ["'broken_tasks'", "failed while importing", "not_installed"],
        ),
        ("no_such_module_here:TASK", ["cannot import module", "PYTHONPATH"]),
        ("toy_tasks:MISSING", ["'toy_tasks' has no attribute 'MISSING'"]),
        ("toy_tasks:NOT_A_TASK", ["not a common.tasks.task.Task", "'read_raw'"]),
        ("half_tasks:TASK", ["'half_tasks'", "missing 3 required", "'model'"]),
    ],
)
def test_a_bad_task_is_refused_naming_module_attribute_and_part(
    toy_module: str, value: str, named: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig(task=value)
    message = str(err.value)
    assert message.startswith("run config key 'task'")
    for part in named:
        assert part in message, message


def test_the_old_dataset_key_names_the_new_one() -> None:
    """One home per fact: 'dataset' is refused in one line that names 'task'."""
    for fail in (
        lambda: RunConfig.from_run_config({"dataset": "mnist"}),
        lambda: check_key("dataset", "mnist"),
    ):
        with pytest.raises(
            ConfigError, match="'dataset' is now 'task': set task = 'mnist'"
        ):
            fail()


def test_models_a_gradient_path_cannot_train_are_refused_up_front(toy_module: str) -> None:
    """BatchNorm under DP and a layer 'direct' cannot handle fail with the reason."""
    with pytest.raises(ConfigError, match="'running_mean'|BatchNorm"):
        check_task_model(RunConfig(task="toy_tasks:BN"))
    with pytest.raises(ConfigError, match="layer '1' is LayerNorm; use 'hooks'"):
        check_task_model(RunConfig(task="toy_tasks:NORM"))
    check_task_model(RunConfig(task="toy_tasks:NORM", grad_sample_mode="hooks"))
    check_task_model(RunConfig(task="toy_tasks:BN", privacy_mode="none", target_epsilon=0))
    assert private_model_problem(nn.Linear(3, 2), "functorch") is None


def test_a_task_limits_the_gradient_paths_and_sites(toy_module: str) -> None:
    import dataclasses

    import toy_tasks

    toy_tasks.ONLY_HOOKS = dataclasses.replace(toy_tasks.TASK, grad_sample_modes=("hooks",))
    with pytest.raises(ConfigError, match="supports 'hooks', got 'direct'"):
        RunConfig(task="toy_tasks:ONLY_HOOKS")
    with pytest.raises(ConfigError, match="'sites' needs a task whose records carry"):
        RunConfig(task="toy_tasks:BN", partitioner="sites")


def test_sites_partition_one_client_per_site() -> None:
    sites = np.array(["b", "a", "c", "a", "b", "b"])
    labels = np.zeros(6, dtype=np.int64)
    shards = partition_indices(labels, PartitionSpec("sites", 3, seed=0), 2, sites)
    assert [s.tolist() for s in shards] == [[1, 3], [0, 4, 5], [2]]  # a, b, c
    with pytest.raises(PartitionError, match="come from 3 sites; run 3 clients, got 2"):
        partition_indices(labels, PartitionSpec("sites", 2, seed=0), 2, sites)
    with pytest.raises(PartitionError, match="natural site"):
        partition_indices(labels, PartitionSpec("sites", 3, seed=0), 2, None)


def test_preprocessing_descriptions_reproduce_the_training_input() -> None:
    """What model.json says is exactly what training fed the model."""
    rng = np.random.default_rng(0)
    image = ImagePreprocessing(side=8, pixel_scale=16.0, mean=0.3, std=0.4)
    raw = rng.integers(0, 17, size=(5, 8, 8))
    expected = ((raw.astype(np.float32) / 16.0 - 0.3) / 0.4)[:, None].astype(np.float32)
    assert np.array_equal(image(raw), expected)  # the built-ins' numbers, unchanged
    affine = AffinePreprocessing(raw_shape=(3,), offset=(1.0, 2.0, 3.0), scale=2.0)
    table = rng.normal(size=(4, 3))
    for prep, x in ((image, raw), (affine, table)):
        meta = json.loads(json.dumps({"preprocessing": prep.describe()}))
        meta["input_shape"] = list(prep.input_shape)
        predicted = model_input(meta, x.reshape(len(x), -1))  # what a device computes
        np.testing.assert_allclose(predicted, prep(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="invalid scale"):
        AffinePreprocessing(raw_shape=(3,), scale=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="invalid function"):
        CallablePreprocessing(function="no_colon", raw_shape=(3,), input_shape=(3,))


def test_the_example_task_imports_no_torch_and_trains_its_model() -> None:
    """docs/tasks.md's example: cheap to import; its model fits its input shape."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(EXAMPLE.parent)!r})
        from common.config import RunConfig
        cfg = RunConfig(task="my_task:TASK")
        heavy = [m for m in ("torch", "sklearn") if m in sys.modules]
        assert not heavy, heavy
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        load_task_reference.cache_clear()
        task = get_task("my_task:TASK")
        model = task.model(task.num_classes, "pixels")
        assert model(torch.zeros(4, *task.input_shape)).shape == (4, 3)
    finally:
        sys.path.remove(str(EXAMPLE.parent))
        sys.modules.pop("my_task", None)
        load_task_reference.cache_clear()


def test_metrics_follow_the_task_family(
    toy_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'binary' calls metrics.evaluate_binary_model (imported lazily, refused clearly
    when absent); a task's own loss replaces the cross-entropy in the scores."""
    import dataclasses

    import toy_tasks

    from common.tasks import metrics
    from common.tasks.scoring import evaluate_task

    binary = dataclasses.replace(toy_tasks.TASK, metrics="binary")
    model = toy_tasks.model(2, "pixels")
    x, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    monkeypatch.delattr(metrics, "evaluate_binary_model", raising=False)
    with pytest.raises(RuntimeError, match="evaluate_binary_model"):
        evaluate_task(binary, model, x, y)
    monkeypatch.setattr(
        metrics,
        "evaluate_binary_model",
        lambda m, x, y, batch_size: {"auroc": 0.5},
        raising=False,
    )
    assert evaluate_task(binary, model, x, y) == {"auroc": 0.5}

    def doubled(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
        return 2 * nn.functional.cross_entropy(logits, target, reduction=reduction)

    plain = evaluate_task(toy_tasks.TASK, model, x, y)
    own = evaluate_task(dataclasses.replace(toy_tasks.TASK, loss=doubled), model, x, y)
    assert own["loss"] == pytest.approx(2 * plain["loss"])
    assert own["accuracy"] == plain["accuracy"]


def test_a_model_the_export_cannot_script_is_refused_up_front(
    toy_module: str,
) -> None:
    """A user's model TorchScript cannot compile fails before round 1, not after."""
    import dataclasses

    import toy_tasks

    from server.export.torchscript import check_exportable

    class Unscriptable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * len({id(x): x})  # a dict comprehension: unscriptable

    toy_tasks.UNSCRIPTABLE = dataclasses.replace(
        toy_tasks.TASK, model=lambda num_classes, features: Unscriptable()
    )
    check_exportable(RunConfig(task="toy_tasks:TASK"))
    with pytest.raises(ConfigError, match="cannot be exported as TorchScript"):
        check_exportable(RunConfig(task="toy_tasks:UNSCRIPTABLE"))
