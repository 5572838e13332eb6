"""Drive the process engine's backend as Flower's simulation runtime does, in a fresh
process (workers are forked while it has one thread; pytest's has several).

    python -m tests.helpers.process_engine_probe APP_DIR OUT_JSON

APP_DIR holds ``probe_app.py`` with a ClientApp ``app`` (written by the test). The
probe forks two workers, loads the app in them, runs messages from two threads at
once, a failing one, one whose reply cannot be sent, kills one worker while it is
idle, crashes the other mid-message, and records what it saw.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    RecordDict,
)

from simulations.engine import process_backend, process_workers
from simulations.launch.in_process_federation import delivered


def _message(node: int, **flags: bool) -> Message:
    array = Array(np.arange(4096, dtype=np.float32))
    array.children  # noqa: B018 - Flower caches the chunks as memoryviews
    config = {"fail": False, "unpicklable": False, "crash": False, **flags}
    content = RecordDict(
        {"weights": ArrayRecord({"w": array}), "config": ConfigRecord(config)}
    )
    return delivered(content, "train", node)  # as a SuperNode delivers it


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                   run_config={})  # fmt: skip


def _outcome(
    backend: process_backend.ProcessBackend, node: int, **flags: bool
) -> list[str]:
    try:
        backend.process_message(_message(node, **flags), _context(node))
    except Exception as exc:  # noqa: BLE001 - what kind, recorded
        return [type(exc).__name__, str(exc)]
    return ["ok", ""]


def _wait_dead(pid: int) -> None:
    """Until our child ``pid`` can be reaped, without reaping it (the backend must
    notice by itself). /proc's "Z" is not enough: the group leader shows it while
    the worker's other threads are still exiting, and waitpid cannot reap it yet."""
    for _ in range(100):
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        time.sleep(0.05)


def main(app_dir: str, out: str) -> int:
    seen: dict[str, Any] = {"threads_before_fork": threading.active_count()}
    process_workers.fork_workers(2)
    ref = process_workers.AppRef(app_dir, "probe_app:app", "", "", "")
    process_backend.APP["app"] = ref
    backend = process_backend.ProcessBackend({})
    backend.build(lambda: None)  # type: ignore[arg-type,return-value]
    seen["num_workers"] = backend.num_workers
    replies: list[dict[str, Any]] = []

    def one(node: int) -> None:
        message = _message(node)
        reply, context = backend.process_message(message, _context(node))
        record = reply.content.config_records["seen"]
        replies.append({
            "node": node, "pid": record["pid"], "draw": record["draw"],
            "sum": record["sum"], "argv": record["argv"],
            "answers": reply.metadata.reply_to_message_id == message.metadata.message_id,
            "state": context.state.config_records["kept"]["node"],
        })  # fmt: skip

    threads = [threading.Thread(target=one, args=(n,)) for n in (11, 12, 13, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen["replies"] = replies
    # read once both have served a message: a worker names itself as it starts,
    # a moment after the fork returns
    seen["worker_names"] = [
        Path(f"/proc/{w.pid}/comm").read_text().strip() for w in process_workers.FORKED
    ]
    seen["failure"] = _outcome(backend, 15, fail=True)
    seen["unpicklable"] = _outcome(backend, 16, unpicklable=True)
    seen["workers_after_errors"] = backend.num_workers
    victim = backend.workers[0].pid
    os.kill(victim, signal.SIGKILL)  # while it waits for a message
    _wait_dead(victim)
    seen["after_idle_kill"] = [_outcome(backend, n) for n in (17, 18)]
    seen["workers_after_idle_kill"] = backend.num_workers
    pids = [w.pid for w in backend.workers]
    seen["crash"] = _outcome(backend, 19, crash=True)
    seen["workers_after_crash"] = backend.num_workers
    started = time.monotonic()
    seen["none_left"] = _outcome(backend, 20)
    seen["none_left_seconds"] = time.monotonic() - started
    backend.terminate()
    seen["left_running"] = [
        p
        for p in [victim, *pids]
        if Path(f"/proc/{p}").exists()
        and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
    ]
    sys.stdout.flush()
    Path(out).write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
