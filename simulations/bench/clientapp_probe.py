"""Measure one ClientApp message from inside its own process: CPU and peak RSS per phase.

On a SuperNode every message runs in a fresh ``flwr-clientapp`` process. A benchmark
puts :func:`install_probe`'s folder first on the SuperNode's ``PATH``; its
``flwr-clientapp`` runs :func:`main`, which runs Flower's own ``flwr_clientapp()``
unchanged and only wraps, to time them, the steps Flower calls (pull the task,
install the FAB, import the app, call it, push the reply) and, once the app imports
its training module, privfed's shard loading, feature map and training functions. At exit it
appends one JSON line to ``$PRIVFED_PROBE_DIR/messages.jsonl``: each phase's CPU
seconds (user + system, exclusive of nested phases) and wall seconds, the CPU spent
before the first line of Python ran (interpreter start-up), the totals up to the
reply and to exit, the peak RSS (``ru_maxrss``), the message type and which heavy
modules the process had imported.

Measurement only: nothing here changes what Flower or the app does.
"""

from __future__ import annotations

import os
import time

_CPU_AT_START = time.process_time()  # interpreter start-up, before any import below
_WALL_AT_START = time.perf_counter()

import atexit  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

PROBE_DIR_ENV = "PRIVFED_PROBE_DIR"
MESSAGES_FILE = "messages.jsonl"
# Modules a client message should not need; the probe reports which were imported.
HEAVY_MODULES = (
    "opacus.privacy_engine",
    "opacus.optimizers",
    "sklearn",
    "sklearn.metrics",
    "pandas",
    "matplotlib",
    "datasets",
    "flwr_datasets",
    "scipy.stats",
    "kymatio",
)
# (module, attribute, phase) wrapped once the app is imported; a missing one is reported.
# Phases of one message, in the order they happen, with the label a report gives each.
PHASES = (
    ("interpreter", "interpreter start-up"),
    ("flower_import", "Flower's flwr-clientapp imports"),
    ("pull_task", "pull the task (message, context, FAB)"),
    ("fab_install", "FAB install (Flower: unzip, verify hashes)"),
    ("app_import", "import client.app, and client.train_evaluate (torch) if it trains"),
    ("data", "data: load, check, partition (or read the cache)"),
    ("features", "features (ScatterNet) of the shard"),
    ("app_other", "rest of the app: policy, ledger, σ, ε, model, reply records"),
    ("training", "training (DP-SGD)"),
    ("reply", "send the reply"),
)


APP_PHASES = (
    ("client.train_evaluate", "load_client_shard", "data"),
    ("client.data.local_data", "compute_features", "features"),
    ("client.train_evaluate", "train_private", "training"),
    ("client.train_evaluate", "train_non_private", "training"),
)


class PhaseClock:
    """CPU and wall seconds per phase, each exclusive of the phases nested in it."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [cpu nested, wall nested] per open phase
        self.marks: dict[str, float] = {}

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` that adds its own (exclusive) time to ``phase`` on every call."""

        def run(*args: Any, **kwargs: Any) -> Any:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            self._stack.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                nested_cpu, nested_wall = self._stack.pop()
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - nested_cpu
                self.wall[phase] = self.wall.get(phase, 0.0) + wall - nested_wall
                if self._stack:
                    self._stack[-1][0] += cpu
                    self._stack[-1][1] += wall

        return run

    def add(self, phase: str, cpu: float, wall: float) -> None:
        """Record a phase measured outside :meth:`timed`."""
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu
        self.wall[phase] = self.wall.get(phase, 0.0) + wall


def _wrap_app(clock: PhaseClock, record: dict[str, Any]) -> None:
    """Time privfed's own phases inside the app (called once client.app is imported)."""
    missing = []
    for module_name, attribute, phase in APP_PHASES:
        module = sys.modules.get(module_name)
        if module is None or not callable(getattr(module, attribute, None)):
            missing.append(f"{module_name}.{attribute}")
            continue
        setattr(module, attribute, clock.timed(phase, getattr(module, attribute)))
    record["unwrapped"] = missing


def _time_training_import(clock: PhaseClock, record: dict[str, Any]) -> None:
    """``client.app`` imports the training module (and torch) when a message first
    needs it: that import counts as ``app_import``, and its phases are wrapped then."""
    app_module = sys.modules.get("client.app")
    if app_module is None:  # not privfed's app: nothing more to time
        return
    real = app_module.importlib.import_module

    def import_module(name: str) -> Any:
        if name in sys.modules:
            return real(name)
        module = clock.timed("app_import", real)(name)
        _wrap_app(clock, record)
        return module

    app_module.importlib = SimpleNamespace(import_module=import_module)


def _instrument(clock: PhaseClock, record: dict[str, Any]) -> None:
    """Wrap the steps of Flower's ``run_clientapp`` (looked up as module globals)."""
    from flwr.supernode.runtime import run_clientapp as rc

    rc.pull_task_input = clock.timed("pull_task", rc.pull_task_input)
    rc.install_from_fab = clock.timed("fab_install", rc.install_from_fab)
    original_push = rc.push_message

    def push(*args: Any, **kwargs: Any) -> Any:
        result = clock.timed("reply", original_push)(*args, **kwargs)
        clock.marks["reply_sent_cpu"] = time.process_time()
        clock.marks["reply_sent_wall"] = time.perf_counter()
        return result

    rc.push_message = push
    make_loader = rc.get_load_client_app_fn

    def get_loader(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        load = clock.timed("app_import", make_loader(*args, **kwargs))

        def loaded(*a: Any, **kw: Any) -> Callable[..., Any]:
            client_app = load(*a, **kw)
            _time_training_import(clock, record)
            call = clock.timed("app_other", client_app)

            def answer(message: Any, context: Any) -> Any:
                record["message_type"] = str(message.metadata.message_type)
                record["partition_id"] = context.node_config.get("partition-id")
                return call(message=message, context=context)

            return answer

        return loaded

    rc.get_load_client_app_fn = get_loader


def _write(clock: PhaseClock, record: dict[str, Any], out_dir: Path) -> None:
    cpu_now, wall_now = time.process_time(), time.perf_counter()
    phases = {"interpreter": _CPU_AT_START, **clock.cpu}
    record.update(
        pid=os.getpid(),
        cpu=phases,
        wall={"interpreter": None, **clock.wall},
        cpu_to_reply=clock.marks.get("reply_sent_cpu"),
        wall_to_reply=(
            clock.marks["reply_sent_wall"] - _WALL_AT_START
            if "reply_sent_wall" in clock.marks
            else None
        ),
        cpu_total=cpu_now,
        wall_total=wall_now - _WALL_AT_START,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        heavy_modules=[m for m in HEAVY_MODULES if m in sys.modules],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / MESSAGES_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")  # one short line: appends do not interleave


def main() -> int | None:
    """Flower's ``flwr-clientapp`` entry point, timed."""
    clock = PhaseClock()
    record: dict[str, Any] = {}
    out_dir = Path(os.environ[PROBE_DIR_ENV])
    atexit.register(_write, clock, record, out_dir)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    _instrument(clock, record)
    clock.add("flower_import", time.process_time() - cpu0, time.perf_counter() - wall0)
    sys.argv[0] = "flwr-clientapp"  # Flower picks its exit behaviour by this name
    return flwr_clientapp()


def install_probe(folder: Path, out_dir: Path, path: str) -> dict[str, str]:
    """Write ``folder/flwr-clientapp``; return the environment a SuperNode needs for it.

    ``path`` is the ``PATH`` the SuperNode would otherwise have; ``folder`` goes first,
    so that its SuperExec starts the probe instead of Flower's console script.
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from simulations.bench.clientapp_probe import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{path}", PROBE_DIR_ENV: str(out_dir)}


def read_messages(out_dir: Path) -> list[dict[str, Any]]:
    """Every message the probe recorded in ``out_dir``, in the order they ended."""
    path = out_dir / MESSAGES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
