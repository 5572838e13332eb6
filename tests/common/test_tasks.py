"""The task registry: one module and one registration make a dataset.

Built-ins are listed without importing them (a ClientApp is a fresh process per
message), every dataset fact is read from its task, and a task registered at run
time is accepted by the run config, the launchers' options and the model builder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.config import ConfigError, RunConfig
from common.data.datasets import load_arrays
from common.data.features import SCATTERING_SHAPE
from common.tasks.models import build_model
from common.tasks.registry import TASKS, get_task, register_task, task_names
from common.tasks.task import ImagePreprocessing, RawPart, Task
from simulations.launch.options import add_run_options

REPO = Path(__file__).resolve().parents[2]
IMAGE_TASKS = ("digits", "fashion-mnist", "mnist")
BUILT_IN = (*IMAGE_TASKS, "lending-club", "nwtco", "flights", "sentiment")
LIST_AND_CHECK = """
import json, sys
from common.tasks.registry import task_names
names = task_names()
listed = sorted(m for m in sys.modules if m.startswith("common.tasks."))
from common.config import RunConfig
RunConfig(task="mnist", features="scattering", classes_per_client=10)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sklearn"))
print(json.dumps({"names": names, "listed": listed, "heavy": heavy}))
"""


def test_built_ins_are_listed_without_importing_them() -> None:
    """Listing imports no task module; checking a config imports neither torch nor
    scikit-learn (a fresh process, as a ClientApp message gets)."""
    proc = subprocess.run(
        [sys.executable, "-c", LIST_AND_CHECK],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuple(out["names"]) == BUILT_IN
    assert out["listed"] == [
        "common.tasks.preprocessing", "common.tasks.registry", "common.tasks.task"
    ]  # fmt: skip
    assert out["heavy"] == []


def test_an_unknown_name_names_the_key_and_the_tasks() -> None:
    """The registry, the model builder and the config give the same error."""
    expected = (
        "run config key 'task': must be one of 'digits', 'fashion-mnist', 'mnist', "
        "'lending-club', 'nwtco', 'flights', 'sentiment'"
    )
    for fail in (
        lambda: get_task("cifar-10"),
        lambda: build_model("cifar-10"),
        lambda: RunConfig(task="cifar-10"),
    ):
        with pytest.raises(ConfigError) as err:
            fail()
        assert str(err.value).startswith(expected)
        assert str(err.value).endswith("got 'cifar-10'")


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_each_task_model_answers_its_classes(name: str) -> None:
    """Every feature map a task takes gives a model with num_classes outputs."""
    task = get_task(name)
    assert len(task.class_labels) == task.num_classes == 10
    inputs = {"pixels": task.input_shape, "scattering": SCATTERING_SHAPE}
    for features in task.features:
        model = build_model(name, seed=0, features=features)
        assert model(torch.zeros(3, *inputs[features])).shape == (3, task.num_classes)


def test_a_task_with_impossible_facts_is_refused() -> None:
    """Scattering needs 28x28 images; binary metrics need two classes."""
    digits = get_task("digits")
    for change in (
        {"features": ("pixels", "scattering")},
        {"class_labels": ("0",)},
        {"metrics": "binary"},
        {"grad_sample_modes": ("fastest",)},
        {"model": None},
    ):
        with pytest.raises(ValueError, match="task 'digits': invalid"):
            dataclasses.replace(digits, **change)
    with pytest.raises(ValueError, match="invalid std"):
        ImagePreprocessing(side=8, pixel_scale=16.0, mean=0.3, std=0.0)
    with pytest.raises(ValueError, match="already registered"):
        register_task(digits)


# --- a dataset added at run time -----------------------------------------------------


def _read_tiny(task: Task, data_dir: str, seed: int, part: str) -> RawPart:
    n = 30 if part == "train" else 9
    rng = np.random.default_rng([seed, n])
    images = rng.integers(0, 256, size=(n, *task.preprocessing.raw_shape))
    return images, rng.integers(0, task.num_classes, size=n)


def _tiny_model(num_classes: int, features: str) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))


@pytest.fixture
def tiny() -> Iterator[Task]:
    """A three-class 4x4 task, registered for the test only."""
    task = register_task(
        Task(
            name="tiny", class_labels=("a", "b", "c"),
            preprocessing=ImagePreprocessing(side=4, pixel_scale=255.0, mean=0.5, std=0.25),
            model=_tiny_model, read_raw=_read_tiny,
        )
    )  # fmt: skip
    try:
        yield task
    finally:
        TASKS.unregister("tiny")


def test_a_registered_task_is_a_dataset_everywhere(tiny: Task) -> None:
    """Registering one task object makes it a run-config value, a launcher
    choice, a model and a dataset; its own facts drive the config rules."""
    names = task_names()  # other tests may have registered tasks of their own
    assert names[: len(BUILT_IN)] == BUILT_IN and names[-1] == "tiny"
    cfg = RunConfig(task="tiny", partitioner="pathological", classes_per_client=3)
    with pytest.raises(ConfigError, match="'classes-per-client': must be <= 3"):
        RunConfig(task="tiny", classes_per_client=4)
    with pytest.raises(ConfigError, match=r"'scattering' needs 28x28 images \(fashion"):
        RunConfig(task="tiny", features="scattering")
    with pytest.raises(ConfigError, match="'tiny' or 'package.module:attribute'"):
        RunConfig(task="huge")
    parser = argparse.ArgumentParser()
    add_run_options(parser, "nodes")
    assert parser.parse_args(["--task", "tiny"]).task == "tiny"
    assert parser.parse_args(["--dataset", "tiny"]).task == "tiny"  # its old name

    model = build_model(cfg.task, seed=0)
    assert model(torch.zeros(5, *tiny.input_shape)).shape == (5, 3)
    data = load_arrays("tiny", "", 7)
    assert data.x_train.shape == (30, 1, 4, 4) and data.num_classes == 3
    raw, _ = _read_tiny(tiny, "", 7, "train")
    np.testing.assert_allclose(data.x_train[:, 0], (raw / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_a_task_module_registers_by_decorator(tiny: Task) -> None:
    """``@register_task`` on a function registers the task it returns."""

    @register_task
    def tinier() -> Task:
        return dataclasses.replace(tiny, name="tinier")

    try:
        assert isinstance(tinier, Task) and get_task("tinier") is tinier
    finally:
        TASKS.unregister("tinier")
