"""Flower's ``flwr-simulation`` with the simulation engine the launcher chose.

Flower's SuperExec starts ``flwr-simulation`` by name from ``PATH`` for each run. The
launcher puts a script of that name first on ``PATH`` (:func:`write_script`) that
calls :func:`flwr_simulation` here, which runs Flower's own entry point either as is
(``$PRIVFED_ENGINE`` is ``ray``: Flower's Ray backend) or with the process engine:

1. import what the ServerApp and every ClientApp import (torch, Opacus, Flower);
2. fork ``$PRIVFED_ENGINE_WORKERS`` ClientApp workers while this process has no
   other thread (:mod:`simulations.engine.process_workers`);
3. hand Flower's simulation runtime the process backend
   (:mod:`simulations.engine.process_backend`) where it would build its Ray
   backend. Flower 1.42 builds ``RayBackend`` whatever the run's backend name
   (``backend_fn`` in ``vce_api.start_vce`` imports it from
   ``vce/backend/raybackend.py``), so that module's name is bound to one holding
   this backend, and ``start_vce``'s arguments (the run's app) are recorded first.
   ``tests/simulations/test_process_engine.py`` pins the lines of Flower this needs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENGINE_ENV = "PRIVFED_ENGINE"
WORKERS_ENV = "PRIVFED_ENGINE_WORKERS"
RAYBACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"
SCRIPT_NAME = "flwr-simulation"
# Third-party imports shared by the ServerApp and the workers (never the app's own
# packages: they come from the run's FAB). Opacus alone is about 1.1 CPU-s.
PRELOAD = (
    "flwr.simulation.app", "flwr.clientapp.utils", "torch", "numpy", "scipy.special",
    "opacus",
)  # fmt: skip


RAY_PRELOAD = ("ray",)


def engine_preload() -> tuple[str, ...]:
    """What the engine of ``$PRIVFED_ENGINE`` imports before a run: a warm template's
    preload (simulations/launch/warm_template.py) adds it to its own."""
    return PRELOAD if os.environ.get(ENGINE_ENV, "ray") == "process" else RAY_PRELOAD


def worker_count() -> int:
    """``$PRIVFED_ENGINE_WORKERS``, a positive integer."""
    text = os.environ.get(WORKERS_ENV, "")
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(
            f"flwr-simulation: ${WORKERS_ENV} must be a positive integer with "
            f"${ENGINE_ENV}=process, got {text!r}"
        )
    return int(text)


def install_process_engine(workers: int) -> None:
    """Preload, fork the workers, and put the process backend in Ray's place."""
    for name in PRELOAD:
        importlib.import_module(name)
    # Opacus' import gives the root logger a handler; Flower's records stay with
    # Flower's own, as the app's `common` package arranges once it is imported
    # (common/flower_logging.py; the app's packages are never preloaded).
    logging.getLogger("flwr").propagate = False
    from simulations.engine import process_backend, process_workers

    # each worker's thread pools get its share of the machine, as Ray's actors do
    threads = max(1, (os.cpu_count() or 1) // workers)
    process_workers.fork_workers(workers, threads)
    from flwr.server.superlink.fleet import vce

    original: Callable[..., Any] = vce.start_vce

    def start_vce(*args: Any, **kwargs: Any) -> Any:
        if args:  # Flower 1.42 passes every argument by name
            raise TypeError("start_vce: expected keyword arguments only")
        process_backend.record_app(kwargs)
        process_workers.keep_workers(int(kwargs.get("num_supernodes") or workers))
        return original(**kwargs)

    vce.start_vce = start_vce
    stand_in = types.ModuleType(RAYBACKEND_MODULE)
    stand_in.__doc__ = "privfed's process backend, where Flower builds its Ray backend"
    stand_in.RayBackend = process_backend.ProcessBackend  # type: ignore[attr-defined]
    sys.modules[RAYBACKEND_MODULE] = stand_in


def flwr_simulation() -> int | None:
    """Flower's ``flwr-simulation`` entry point, with the chosen engine."""
    engine = os.environ.get(ENGINE_ENV, "ray")
    if engine == "process":
        install_process_engine(worker_count())
    elif engine != "ray":
        raise SystemExit(
            f"flwr-simulation: ${ENGINE_ENV} must be 'process' or 'ray', got {engine!r}"
        )
    from flwr.simulation.app import flwr_simulation as flower_entry

    flower_entry()
    return 0


def write_script(folder: Path) -> Path:
    """Write ``folder/flwr-simulation`` calling :func:`flwr_simulation`; put
    ``folder`` first on the ``PATH`` of the SuperLink that starts runs."""
    script = folder / SCRIPT_NAME
    script.write_text(
        f"#!{sys.executable} -P\n"
        "import sys\n"
        f"from {__name__} import flwr_simulation\n"
        "sys.exit(flwr_simulation())\n"
    )
    script.chmod(0o755)
    return script
