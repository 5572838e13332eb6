"""The tasks a run can name (run key ``task``): built-in names, or a user's module.

A built-in name maps to the *module path* that defines its task, imported on first
use (as for accountants, :mod:`common.privacy.accountants.registry`): listing and
checking names imports nothing, and a ClientApp (a fresh process per message) pays
only for the task it trains. A module defines a :class:`~common.tasks.task.Task`
and hands it to :func:`register_task`, which puts it in place of its path.

A task written outside the package is named ``"package.module:attribute"``: the
attribute is a Task or a zero-argument callable returning one, and the module must
be importable on every machine that runs a client (docs/tasks.md). A module that
fails to import, a missing attribute or an object that is not a whole Task is a
:class:`TaskError` (a :class:`~common.errors.ConfigError`) naming the module, the
attribute and the part, so launchers refuse it before anything starts.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from functools import lru_cache

from common.errors import ConfigError
from common.registry import Registry
from common.tasks.task import REQUIRED_PARTS, Task

# Adding a built-in task: its module, and one line here.
_BUILT_IN = {
    "digits": f"{__package__}.digits",
    "fashion-mnist": f"{__package__}.fashion_mnist",
    "mnist": f"{__package__}.mnist",
    "lending-club": f"{__package__}.credit",
    "nwtco": f"{__package__}.medical",
    "flights": f"{__package__}.flights",
    "sentiment": f"{__package__}.sentiment",
}
TASKS: Registry[Task | str] = Registry("task", _BUILT_IN)
_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")
DOCS = "docs/tasks.md"


class TaskError(ConfigError):
    """Run key ``task`` names something that is not a usable task."""


def task_names() -> tuple[str, ...]:
    """Every built-in (or registered) task name, in registration order; imports none."""
    return TASKS.names()


def built_in_modules() -> tuple[str, ...]:
    """The modules that define the built-in tasks (their code shapes cached shards)."""
    return tuple(_BUILT_IN.values())


def is_task_reference(value: str) -> bool:
    """True if ``value`` has the form ``"package.module:attribute"``."""
    return isinstance(value, str) and _SPEC.fullmatch(value) is not None


def task_module(value: str) -> str | None:
    """The module a ``task`` value's task is defined in (its source keys shards)."""
    if is_task_reference(value):
        return value.partition(":")[0]
    entry = TASKS.get(value) if value in TASKS else None
    return entry if isinstance(entry, str) else None


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


@lru_cache(maxsize=16)
def load_task_reference(value: str) -> Task:
    """The task ``"package.module:attribute"`` names, imported now (once per process)."""
    module_name, _, attribute = value.partition(":")
    where = (
        "it must be importable on every machine that runs a client (PYTHONPATH or an "
        f"installed package; {DOCS})"
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module_name.startswith(exc.name):
            raise TaskError(  # the module exists; something it imports does not
                f"run config key 'task': module {module_name!r} of task {value!r} "
                f"failed while importing: {exc} (install it where clients run)"
            ) from None
        raise TaskError(
            f"run config key 'task': cannot import module {module_name!r} of task "
            f"{value!r} ({exc}); {where}"
        ) from None
    except Exception as exc:  # the user's module raised while importing
        raise TaskError(
            f"run config key 'task': module {module_name!r} of task {value!r} failed "
            f"while importing: {type(exc).__name__}: {exc}"
        ) from None
    if not hasattr(module, attribute):
        raise TaskError(
            f"run config key 'task': module {module_name!r} has no attribute "
            f"{attribute!r} (task {value!r} names a Task or a zero-argument callable "
            "returning one)"
        )
    found = getattr(module, attribute)
    if callable(found) and not isinstance(found, Task):
        try:
            found = found()
        except Exception as exc:
            raise TaskError(
                f"run config key 'task': calling {value!r} (attribute {attribute!r} of "
                f"module {module_name!r}) failed: {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(found, Task):
        missing = [part for part in REQUIRED_PARTS if not hasattr(found, part)]
        lacks = f"; it lacks {', '.join(map(repr, missing))}" if missing else ""
        raise TaskError(
            f"run config key 'task': attribute {attribute!r} of module {module_name!r} "
            f"is a {type(found).__name__}, not a common.tasks.task.Task{lacks} "
            f"(required parts: {', '.join(REQUIRED_PARTS)}; {DOCS})"
        )
    return found


def get_task(name: str | Task) -> Task:
    """The task a ``task`` value names: a built-in (imported now) or a reference."""
    if isinstance(name, Task):
        return name
    if is_task_reference(name):
        return load_task_reference(name)
    entry = TASKS.get(name)
    if isinstance(entry, str):
        importlib.import_module(entry)
        entry = TASKS.get(name)
    if not isinstance(entry, Task):
        raise TypeError(f"module {entry!r} does not register a task named {name!r}")
    return entry
