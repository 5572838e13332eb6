"""The simulation engines a launcher can run Flower's simulation on, and how each starts.

``process`` (the default on one machine): ClientApps run on workers forked from the
simulation process (:mod:`simulations.engine.process_backend`); no Ray process at
all. ``ray``: Flower's own Ray backend, on a private Ray head the launcher starts, or
on the running cluster of ``--ray-address`` (the only way to use several machines,
or to reserve GPUs). docs/simulation.md, "Engines".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from simulations.engine.flwr_simulation import ENGINE_ENV, WORKERS_ENV, write_script
from simulations.launch.options import ConfigError
from simulations.launch.ray_head import RayHead, ray_for_runs


@dataclass(frozen=True)
class Engine:
    """A way to run the simulation's ClientApps."""

    name: str
    uses_ray: bool
    summary: str  # for --help

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"an engine's name is a word, got {self.name!r}")


PROCESS = Engine("process", False, "ClientApp workers forked from the simulation process")
RAY = Engine("ray", True, "Flower's Ray backend: a private Ray head, or --ray-address")
ENGINES: dict[str, Engine] = {e.name: e for e in (PROCESS, RAY)}


def choose_engine(asked: str | None, ray_address: str | None) -> Engine:
    """``--engine``, by default ``ray`` on a cluster (``--ray-address``) and
    ``process`` otherwise; the process engine cannot use a cluster."""
    if asked is None:
        return RAY if ray_address else PROCESS
    engine = ENGINES[asked]
    if ray_address and not engine.uses_ray:
        raise ConfigError(
            f"--engine {asked} runs on this machine only; --ray-address "
            f"{ray_address} (or $RAY_ADDRESS) needs --engine ray"
        )
    return engine


@dataclass(frozen=True)
class RunningEngine:
    """What the runs of a launcher attach to; ``head`` is a private Ray head."""

    engine: Engine
    workers: int  # ClientApp workers per run (process engine)
    head: RayHead | None
    ray_address: str | None

    def describe(self) -> str:
        """What the log says of it."""
        if not self.engine.uses_ray:
            return f"process engine, {self.workers} ClientApp workers per run"
        if self.head is not None:
            return f"Ray: {self.head.describe()}"
        return f"Ray: the running Ray cluster at {self.ray_address}"


@contextmanager
def engine_for_runs(
    engine: Engine,
    env: dict[str, str],
    work_dir: Path,
    ray_address: str | None,
    ray_cpus: int,
    workers: int,
) -> Iterator[RunningEngine]:
    """Set ``env`` for the engine before any Flower process starts with it: the
    ``flwr-simulation`` script first on ``PATH`` and the engine's variables (each
    run of the process engine forks ``workers``); start a private Ray head of
    ``ray_cpus`` CPUs where the Ray engine has no cluster."""
    folder = work_dir / "engine-bin"
    folder.mkdir(exist_ok=True)
    write_script(folder)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    env[ENGINE_ENV] = engine.name
    env[WORKERS_ENV] = str(workers)
    if not engine.uses_ray:
        yield RunningEngine(engine, workers, None, None)
        return
    with ray_for_runs(env, work_dir, ray_address, ray_cpus) as head:
        yield RunningEngine(engine, workers, head, ray_address)
