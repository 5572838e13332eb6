"""Tabular tasks go through the generic Task: packaged federations and a user's CSV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from common.tasks.csv_table import csv_table_task
from common.tasks.registry import get_task

SCHEMA = """\
[label]
column = "outcome"
classes = ["alive", "dead"]
[site]
column = "hospital"
values = ["north", "south"]
[columns.age]
type = "numeric"
range = [0, 120]
[columns.sex]
type = "categorical"
categories = ["f", "m"]
"""


def test_a_users_csv_becomes_a_binary_task_with_natural_sites(tmp_path: Path) -> None:
    (tmp_path / "schema.toml").write_text(SCHEMA)
    rows = "outcome,hospital,age,sex\nalive,north,60,f\ndead,south,90,m\nalive,south,30,m\n"
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "test.csv").write_text(rows)
    task = csv_table_task("ward", tmp_path / "schema.toml", "train.csv", "test.csv")
    assert task.metrics == "binary" and task.natural_sites and task.input_shape == (3,)
    x, y, sites = task.raw_with_sites("train", str(tmp_path), 0)
    np.testing.assert_array_equal(x, [[0.5, 1, 0], [0.75, 0, 1], [0.25, 0, 1]])
    assert y.tolist() == [0, 1, 0] and sites.tolist() == ["north", "south", "south"]
    assert task.model(2, "pixels")(torch.from_numpy(task.preprocess(x))).shape == (3, 2)
    assert len(task.raw("test", str(tmp_path), 0)[0]) == 3


def test_the_packaged_federations_are_tasks_with_sites() -> None:
    for reference, width, sites in (
        ("common.tasks.credit:LENDING_CLUB", 5, {"Northeast", "Midwest", "South", "West"}),
        ("common.tasks.medical:NWTCO", 9, {"3", "4"}),
    ):
        task = get_task(reference)
        assert task.input_shape == (width,) and task.metrics == "binary"
        x, y, site = task.raw_with_sites("train", "", 42)
        assert set(site.tolist()) == sites and len(x) == len(y) == len(site)
        assert task.training_sources("")[0].suffix == ".toml"


def test_a_task_module_imports_neither_torch_nor_pandas_nor_sklearn() -> None:
    probe = (
        "import sys, common.tasks.credit, common.tasks.medical, common.tasks.csv_table; "
        "print(sorted(m for m in ('torch', 'pandas', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
