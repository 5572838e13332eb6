"""The tasks a run can name (run key ``dataset``): the one place that lists datasets.

As for accountants (:mod:`common.privacy.accountants.registry`), a built-in name maps
to the *module path* that defines its task, imported on first use: listing and
checking names imports nothing, and a ClientApp (a fresh process per message) pays
only for the task it trains. A module defines a :class:`~common.tasks.task.Task`
and hands it to :func:`register_task`, which puts it in place of its path. Another
task is added at runtime the same way.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from common.registry import Registry
from common.tasks.task import Task

# Adding a dataset: its module, and one line here.
_BUILT_IN = {
    "digits": f"{__package__}.digits",
    "fashion-mnist": f"{__package__}.fashion_mnist",
    "mnist": f"{__package__}.mnist",
}
TASKS: Registry[Task | str] = Registry("dataset", _BUILT_IN)


def task_names() -> tuple[str, ...]:
    """Every dataset a run may name, in registration order; imports no task."""
    return TASKS.names()


def built_in_modules() -> tuple[str, ...]:
    """The modules that define the built-in tasks (their code shapes cached shards)."""
    return tuple(_BUILT_IN.values())


def register_task(task: Task | Callable[[], Task]) -> Task:
    """Make ``task`` selectable by its name and return it.

    Also a decorator on a function returning the task. A name is registered once;
    only the module a name is listed under (while it is imported) replaces it.
    """
    if not isinstance(task, Task):
        task = task()
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a Task, got {type(task).__name__}")
    listed = TASKS.get(task.name) if task.name in TASKS else None
    TASKS.register(
        task.name, task, replace=isinstance(listed, str) and listed in sys.modules
    )
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name`` (its module imported now if it was not)."""
    entry = TASKS.get(name)
    if isinstance(entry, str):
        importlib.import_module(entry)
        entry = TASKS.get(name)
    if not isinstance(entry, Task):
        raise TypeError(f"module {entry!r} does not register a task named {name!r}")
    return entry
