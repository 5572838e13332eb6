"""An isolated Flower environment: FLWR_HOME, loopback-only Ray, a local SuperLink."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from simulations.launch.processes import ManagedProcess, free_port, wait_until
from simulations.launch.superexec_wakeup import superlink_command
from simulations.launch.warm_template import APP_PACKAGES, SIMULATION, wrapper_args

CONNECTION_NAME = "privfed-local"
APP_FILES = ("pyproject.toml", "README.md", "LICENSE")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the Flower app (pyproject and the app's packages) to ``dest/app``.

    ``flwr run <dir>`` walks every file under ``<dir>`` before filtering what goes
    into the FAB; in a checkout that includes ``.venv`` (~48,000 files, 8–13 s
    here). Building from a staged copy of just the app takes well under a second.
    """
    staged = dest / "app"
    staged.mkdir(parents=True)
    for name in APP_FILES:
        shutil.copy2(app_dir / name, staged / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in APP_PACKAGES:
        shutil.copytree(app_dir / package, staged / package, ignore=ignore)
    return staged


def install_app(staged: Path, homes: Iterable[Path]) -> list[Path]:
    """Install the staged app's FAB into each FLWR_HOME before runs are submitted.

    Flower 1.42 installs a FAB in place, not atomically (``validate_and_install``
    in ``flwr/cli/install.py``: create the folder, then copy into it), and a
    process that finds the folder already there uses it. FAB builds are
    deterministic, so runs of the same app submitted side by side (a sweep, or
    several runs on one deployment) install into the same folder at once, and
    one of them can start before ``pyproject.toml`` is copied and exit with
    code 201 ("Cannot find pyproject.toml"). Installed here first, in one
    process, the folder is complete before any Flower process looks. The FAB is
    built with the function ``flwr run`` uses, so the hash, and the folder, match.
    Returns the install folder under each home.
    """
    from flwr.cli.build import build_fab_from_disk  # imported when used: flwr.cli is slow
    from flwr.cli.install import install_from_fab

    fab = build_fab_from_disk(staged)
    installed = []
    for home in homes:
        with contextlib.redirect_stdout(io.StringIO()):  # Flower's "Successfully ..."
            installed.append(install_from_fab(fab, install_dir=home, skip_prompt=True))
    return installed


def flower_environment(flwr_home: Path, ray_address: str | None = None) -> dict[str, str]:
    """Environment for every Flower process a script starts.

    A simulation attaches to the Ray cluster at ``ray_address`` (``HOST:PORT`` of
    its head): Flower's backend calls ``ray.init()`` without an address, and Ray
    reads ``RAY_ADDRESS``. Without one it gets ``RAY_ADDRESS=local``, a private
    Ray instance, even when ``ray start`` left a cluster on this machine that
    ``ray.init()`` would otherwise join. Ray binds only 127.0.0.1 unless the
    caller already set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (docs/simulation.md).
    """
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Flower's SuperExec looks for a task to start (a ServerApp, a ClientApp message)
    # once a second by default: up to 1 s idle before each one. A tenth of a second
    # costs a few local requests a second (Flower accepts 0.01 to 60); SuperExecs
    # started through launch/superexec_wakeup.py ignore it, woken per task instead.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["RAY_ADDRESS"] = ray_address or "local"
    # Every task process (a ServerApp, a ClientApp message, a simulation run) imports
    # the app's packages from the FAB installed under FLWR_HOME, which has no
    # bytecode. Where PYTHONDONTWRITEBYTECODE is set, each compiled them afresh
    # (about 0.16 CPU-s a ClientApp message); without it the first writes the
    # bytecode there and the rest reuse it. Everything else they import is compiled
    # already (pip's install and `make bytecode`), so nothing else is written.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Flower starts helpers (flower-superexec, flwr-simulation) by name from PATH.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def write_connection(
    flwr_home: Path, address: str, extra: dict[str, Any] | None = None
) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection."""
    conn: dict[str, Any] = {"address": address, "insecure": True, **(extra or {})}
    config = {"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: conn}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class LocalSuperLink:
    """A running simulation SuperLink bound to 127.0.0.1."""

    process: ManagedProcess
    port: int

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"


@contextmanager
def simulation_superlink(
    env: dict[str, str],
    work_dir: Path,
    startup_timeout: float = 120.0,
    warm: bool = False,
) -> Iterator[LocalSuperLink]:
    """Start ``flower-superlink --simulation`` on loopback; stop it and its tree after.

    ``warm``: each run's ``flwr-simulation`` is forked from a template that imported
    Flower's simulation engine, Ray and torch once, while the SuperLink started
    (:mod:`simulations.launch.warm_template`); otherwise it starts cold, as stock.
    Worth it where one SuperLink serves several runs (a sweep): for a single run
    the template's imports only move, and slow the Ray head's start beside them.
    """
    port = free_port()
    args = [
        "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    # its SuperExec woken by each new run instead of asking 10 times a second
    binary = str(Path(sys.executable).parent / "flower-superlink")
    argv = [*(wrapper_args(SIMULATION) if warm else ()), *superlink_command(binary, args)]
    proc = ManagedProcess(
        "flower-superlink", argv, env, work_dir / "superlink.log", work_dir
    )
    try:
        wait_until(lambda: _healthy(port), startup_timeout, "the SuperLink to serve", proc)
        yield LocalSuperLink(proc, port)
    finally:
        proc.stop()
