"""Tabular tasks from a public schema: the packaged federations' and a user's CSV files.

A tabular record's raw form is already its encoded feature vector (the schema's
clipping, public-range scaling, one-hot and missing indicators; see
common/data/tabular/), so the task's preprocessing is the identity on ``(N, F)``
and every constant that shaped the features is in the committed schema file.

A user's own CSV data becomes a task in their own module, named by the run key
``task = "my_module:TASK"``::

    from common.tasks.csv_table import csv_table_task
    TASK = csv_table_task("my-table", "schema.toml", "train.csv", "test.csv")

Numpy and the standard library at import (a ClientApp is a fresh process per
message); torch only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.data.tabular.schema import TabularSchema, load_schema
from common.tasks.task import AffinePreprocessing, RawRead, Task

if TYPE_CHECKING:
    from torch import nn

# ``(task, data_dir, seed, part)`` -> ``(x, y)``, or ``(x, y, sites)`` for training.
TabularReader = Callable[[Task, str, int, str], RawRead]


def tabular_model(model: str, num_features: int) -> Callable[[int, str], nn.Module]:
    """The task's builder ``(num_classes, features)`` for a model of
    :mod:`common.tasks.tabular_models` at the schema's width (imported on first call)."""

    def build(num_classes: int, features: str = "pixels") -> nn.Module:
        from common.tasks.tabular_models import MODELS

        return MODELS[model](num_features, num_classes)

    return build


def schema_task(
    name: str,
    schema: TabularSchema,
    read_raw: TabularReader,
    *,
    class_labels: tuple[str, ...] | None = None,
    model: str = "logistic",
    list_sources: Callable[[Task, str], tuple[Path, ...]] | None = None,
    missing_data_hint: str = "",
) -> Task:
    """A task whose records are encoded by ``schema``: binary metrics for two classes,
    natural sites when the schema names a site column."""
    extra = {"list_sources": list_sources} if list_sources is not None else {}
    return Task(
        name=name,
        class_labels=class_labels or schema.classes,
        model=tabular_model(model, schema.num_features),
        read_raw=read_raw,
        preprocessing=AffinePreprocessing(raw_shape=(schema.num_features,)),
        metrics="binary" if schema.num_classes == 2 else "multiclass",
        natural_sites=schema.site is not None,
        missing_data_hint=missing_data_hint,
        **extra,
    )


def csv_table_task(
    name: str,
    schema_file: Path | str,
    train_csv: Path | str,
    test_csv: Path | str,
    *,
    model: str = "logistic",
) -> Task:
    """A task reading ``train_csv`` (clients) and ``test_csv`` (the server's central
    test set) by the public schema in ``schema_file``; relative CSV paths are taken
    inside the run's ``data-dir`` when it is set."""
    schema = load_schema(schema_file)

    def path(data_dir: str, part: str) -> Path:
        given = Path(train_csv if part == "train" else test_csv)
        return Path(data_dir) / given if data_dir and not given.is_absolute() else given

    def read(task: Task, data_dir: str, seed: int, part: str) -> RawRead:
        from common.data.tabular.csv_records import read_csv_records

        records = read_csv_records(path(data_dir, part), schema)
        if part == "train" and records.sites is not None and schema.site is not None:
            import numpy as np

            return records.x, records.y, np.array(schema.site.values)[records.sites]
        return records.x, records.y

    def sources(task: Task, data_dir: str) -> tuple[Path, ...]:
        return (Path(schema_file), path(data_dir, "train"))

    return schema_task(name, schema, read, model=model, list_sources=sources)
