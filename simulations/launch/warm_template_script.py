"""The script a warm template puts first on ``PATH`` under the name of Flower's command
(``flwr-clientapp``, ``flwr-simulation``).

Flower's SuperExec starts that command by name for every task. The script hands its
command line, environment, working folder and standard streams to the template
(:mod:`simulations.launch.warm_template`), which forks a child that runs Flower's own
entry point with them; it then forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to that
child and exits with its exit code. Standard library only: it is started once per
task and should cost nothing.

If the template cannot be reached (nothing was forked), it says so on standard error
and runs the stock command cold. Once its request is sent it never does: a child may
exist, and two processes must not run one task.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

MAX_REQUEST = 1 << 20  # bytes: command line + environment + folder
# for the template to fork: it accepts only once its imports are done (seconds alone,
# longer on a starved machine); a script that gives up exits 1, never runs cold
PID_TIMEOUT_S = 120.0
# Flower's flag for installing a FAB's dependencies at run time: the template's
# imports would shadow them, so such a message runs in a cold process
RUNTIME_INSTALL_FLAG = "--allow-runtime-dependency-installation"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
STANDARD_STREAMS = (0, 1, 2)


def socket_env(command: str) -> str:
    """The variable naming the socket of ``command``'s template, e.g.
    ``PRIVFED_WARM_FLWR_CLIENTAPP_SOCKET``: one per command, so that a process
    started under two templates (a SuperLink's, a node's) tells them apart."""
    return "PRIVFED_WARM_" + command.upper().replace("-", "_") + "_SOCKET"


@dataclass(frozen=True)
class Request:
    """What one invocation of the command hands over: everything a child needs."""

    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]

    def __post_init__(self) -> None:
        if not all(isinstance(arg, str) for arg in self.argv):
            raise ValueError("argv must be strings")
        if not isinstance(self.cwd, str) or not os.path.isabs(self.cwd):
            raise ValueError(f"cwd must be an absolute path, got {self.cwd!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValueError("env must map strings to strings")

    def encode(self) -> bytes:
        """The request as one datagram."""
        raw = {"argv": list(self.argv), "cwd": self.cwd, "env": self.env}
        return json.dumps(raw).encode()

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Parse a datagram; ``ValueError`` names what is wrong."""
        try:
            raw = json.loads(data)
            return cls(tuple(raw["argv"]), raw["cwd"], dict(raw["env"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed request: {err!r}") from err


def shim_main(command: str, argv: Sequence[str] | None = None) -> int:
    """Run one ``command`` in a child of its template; return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    said = f"warm {command}"
    if RUNTIME_INSTALL_FLAG in args:
        return _cold(command, args, f"{said}: {RUNTIME_INSTALL_FLAG} needs a fresh process")
    path = os.environ.get(socket_env(command), "")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        request = Request(tuple(args), os.getcwd(), dict(os.environ))
        socket.send_fds(conn, [request.encode()], list(STANDARD_STREAMS))
    except (OSError, ValueError) as err:  # nothing was forked: the cold start is safe
        conn.close()
        return _cold(command, args, f"{said}: template at {path!r} unreachable ({err})")
    try:  # from here a child may exist: never start a second process for the task
        conn.settimeout(PID_TIMEOUT_S)
        pid = _read_int(conn, "pid")
    except (OSError, ValueError) as err:
        conn.close()
        print(
            f"{said}: the template at {path!r} did not fork ({err})",
            file=sys.stderr,
        )
        return 1
    conn.settimeout(None)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    try:
        status = _read_int(conn, "exit")
    except (OSError, ValueError) as err:
        print(f"{said}: lost the template ({err}); child {pid}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status < 0:  # killed by a signal: end the same way
        if -status not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


def _read_int(conn: socket.socket, key: str) -> int:
    data = conn.recv(256)
    if not data:
        raise ValueError(f"closed before sending {key!r}")
    value = json.loads(data).get(key)
    if not isinstance(value, int):
        raise ValueError(f"expected {key!r}, got {data!r}")
    return value


def next_on_path(command: str, shim: Path, path: str) -> Path:
    """The ``command`` that ``PATH`` names after the shim's own folder: what would have
    run without the template (the simulation engine's ``flwr-simulation`` script, or
    Flower's console script); Flower's, beside this Python, if there is none."""
    folder = shim.resolve().parent
    for entry in path.split(os.pathsep):
        if not entry or Path(entry).resolve() == folder:
            continue
        candidate = Path(entry) / command
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return Path(sys.executable).parent / command


def _cold(command: str, args: list[str], why: str) -> NoReturn:
    real = next_on_path(command, Path(sys.argv[0]), os.environ.get("PATH", ""))
    print(f"{why}; running {real} cold", file=sys.stderr, flush=True)
    os.execv(str(real), [str(real), *args])
