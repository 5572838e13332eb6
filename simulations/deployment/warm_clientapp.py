"""A SuperNode whose ClientApp processes are forked from one that has already imported
Flower and torch.

A SuperNode runs every message in a fresh ``flwr-clientapp`` process (its SuperExec
starts the console script by name from ``PATH``). Of the 2.2-3.8 CPU-s such a
process costs, about 1.0 is Flower's own imports and 1.3 is ``import torch``; the
message itself (pull, FAB, shard cache, a few DP-SGD steps, reply) is a few tenths.
On a 2-core machine running several nodes that start-up is most of a round.

This module starts the SuperNode with a *template* process beside it:

    python -m simulations.deployment.warm_clientapp -- flower-supernode <its args>

1. It binds a Unix socket in a fresh private folder (mode 0700) and writes a
   ``flwr-clientapp`` there that is put first on the SuperNode's ``PATH``.
2. It forks the template, which imports :data:`PRELOAD` (never privfed's own
   packages: the app is always imported from the FAB the message brings) and waits.
3. It execs the SuperNode command in its own process, so the SuperNode keeps the PID
   its launcher knows (a fault test kills a node by that PID).

When the SuperExec starts ``flwr-clientapp``, that small script (:func:`shim_main`,
standard library only) hands its command line, environment, working folder and
standard streams to the template, which forks a child that runs Flower's own
``flwr_clientapp()`` with them. The script waits, forwards SIGTERM/SIGINT to the
child and exits with the child's exit code.

Still one fresh process per message: a child is a copy of the template, which has
imported modules and run nothing else, so no message sees another's state. Random
state that a copy would share is drawn again in each child (Python's ``random``,
NumPy's global generator); DP noise does not use either (it is seeded from
:func:`secrets.randbits`, common/privacy/randomness.py). Only connections from this
user are served (``SO_PEERCRED``), through a socket only this user can reach.

The template exits with its SuperNode (``PR_SET_PDEATHSIG``, and a check of its
parent), and removes its folder. If it cannot be reached, the script says so on
standard error and runs the stock ``flwr-clientapp`` instead: the same code, cold.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

MODULE = "simulations.deployment.warm_clientapp"
SOCKET_ENV = "PRIVFED_WARM_CLIENTAPP_SOCKET"
SOCKET_NAME = "template.sock"
SHIM_NAME = "flwr-clientapp"
# What a ClientApp message imports that costs start-up time (third-party only).
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "torch", "numpy", "scipy.special")
# The app's own packages: always imported in the child, from the FAB it pulls.
APP_PACKAGES = ("client", "common", "server")
MAX_REQUEST = 1 << 20  # bytes: command line + environment + folder
_PR_SET_PDEATHSIG = 1
_STANDARD_STREAMS = (0, 1, 2)


@dataclass(frozen=True)
class Request:
    """What a ``flwr-clientapp`` invocation hands over: everything a child needs."""

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


def wrapper_args() -> list[str]:
    """The command prefix that starts a SuperNode command with a template beside it."""
    return [sys.executable, "-P", "-m", MODULE, "--"]


# --- the script the SuperExec starts -------------------------------------------------


def shim_main(argv: Sequence[str] | None = None) -> int:
    """Run one ``flwr-clientapp`` in a child of the template; return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(SOCKET_ENV, "")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        request = Request(tuple(args), os.getcwd(), dict(os.environ))
        socket.send_fds(conn, [request.encode()], list(_STANDARD_STREAMS))
        pid = _read_int(conn, "pid")
    except (OSError, ValueError) as err:
        conn.close()
        return _cold(args, f"warm ClientApp template at {path!r} unreachable ({err})")

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        status = _read_int(conn, "exit")
    except (OSError, ValueError) as err:
        print(f"warm ClientApp: lost the template ({err}); child {pid}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status < 0:  # killed by a signal: end the same way
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


def _cold(args: list[str], why: str) -> NoReturn:
    real = Path(sys.executable).parent / SHIM_NAME
    print(f"{why}; running {real} cold", file=sys.stderr, flush=True)
    os.execv(str(real), [str(real), *args])


# --- the template ---------------------------------------------------------------------


def _write_shim(folder: Path) -> None:
    script = folder / SHIM_NAME
    script.write_text(
        f"#!{sys.executable} -P\n"
        "import sys\n"
        f"from {MODULE} import shim_main\n"
        "sys.exit(shim_main())\n"
    )
    script.chmod(0o700)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(0)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in APP_PACKAGES)
    if leaked:  # Flower would reuse them instead of importing the FAB's code
        raise RuntimeError(f"the template imported the app's own modules: {leaked}")


class _Template:
    """Serve fork requests on ``listener`` until the SuperNode (our parent) is gone."""

    def __init__(self, listener: socket.socket, folder: Path, parent: int) -> None:
        self.listener = listener
        self.folder = folder
        self.parent = parent
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> conn, pid
        self.conns: dict[int, tuple[socket.socket, int]] = {}  # conn fd -> conn, pid

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, _exit_on_signal)  # so that the folder is removed
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        while os.getppid() == self.parent:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "child":
                    self._reap(key.fd)
                else:
                    self._hung_up(key.fd)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        size = struct.calcsize("3i")
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
        _, uid, _ = struct.unpack("3i", creds)
        fds: list[int] = []
        try:
            if uid != os.getuid():
                raise PermissionError(f"refused a request from uid {uid}")
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, len(_STANDARD_STREAMS))
            if len(fds) != len(_STANDARD_STREAMS):
                raise ValueError(f"expected 3 standard streams, got {len(fds)}")
            request = Request.decode(data)
        except (OSError, ValueError) as err:
            print(f"warm ClientApp template: {err}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            self._become_clientapp(request, fds)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (conn, pid)
        self.conns[conn.fileno()] = (conn, pid)
        self.selector.register(pidfd, selectors.EVENT_READ, "child")
        self.selector.register(conn, selectors.EVENT_READ, "conn")
        _send(conn, {"pid": pid})

    def _reap(self, pidfd: int) -> None:
        conn, pid = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if conn.fileno() in self.conns:
            del self.conns[conn.fileno()]
            self.selector.unregister(conn)
            _send(conn, {"exit": code})
            conn.close()

    def _hung_up(self, fd: int) -> None:
        """The script went away (killed) before its child ended: end the child too."""
        conn, pid = self.conns.pop(fd)
        self.selector.unregister(conn)
        conn.close()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _become_clientapp(self, request: Request, fds: list[int]) -> NoReturn:
        """In the forked child: become ``flwr-clientapp <argv>``; never return."""
        code: int = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            self.selector.close()
            self.listener.close()
            for conn, _ in self.conns.values():
                conn.close()
            for pidfd in self.children:
                os.close(pidfd)
            for target, fd in zip(_STANDARD_STREAMS, fds, strict=True):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request.cwd)
            os.environ.clear()
            os.environ.update(request.env)
            _fresh_random_state()
            # as the console script has it: its own folder first, not the template's
            sys.path.insert(0, str(Path(sys.executable).parent))
            sys.argv = [SHIM_NAME, *request.argv]
            from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

            flwr_clientapp()
            code = 0
        except SystemExit as done:
            code = _exit_code(done.code)
        except BaseException:  # noqa: BLE001 - reported, then the child ends
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def _exit_code(value: object) -> int:
    """The exit code the interpreter gives ``sys.exit(value)`` (a message is printed)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _fresh_random_state() -> None:
    """Draw again what a copied process would share with its siblings."""
    import random

    random.seed()  # Python also does this after os.fork(); kept explicit
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # the legacy global generator, from OS entropy


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _send(conn: socket.socket, value: dict[str, int]) -> None:
    try:
        conn.send(json.dumps(value).encode())
    except OSError:
        pass  # the script is gone; the child was or will be ended


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Fork the template, then become the SuperNode command after ``--``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["--"] or len(args) < 2:
        print(f"usage: python -m {MODULE} -- <flower-supernode command>", file=sys.stderr)
        sys.exit(2)
    command = args[1:]
    folder = Path(tempfile.mkdtemp(prefix="privfed-warm-"))  # mode 0700
    _write_shim(folder)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(folder / SOCKET_NAME))
    listener.listen(16)
    parent = os.getpid()
    if os.fork() == 0:
        code = 0
        try:
            _die_with_parent(parent)
            _preload()
            _Template(listener, folder, parent).serve()
        except BaseException:  # noqa: BLE001 - reported; the shims then run cold
            traceback.print_exc()
            code = 1
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(code)
    listener.close()
    env = dict(os.environ)
    env[SOCKET_ENV] = str(folder / SOCKET_NAME)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
