"""Flower's per-task processes forked from a template that has already imported Flower
and torch.

Flower's SuperExec runs every task in a fresh process, starting a console script by
name from ``PATH`` (``flwr-clientapp`` per message a SuperNode gets, ``flwr-simulation``
per run a simulation SuperLink is given), and most of such a process's start-up is
imports. This module starts the SuperNode or SuperLink with a *template* beside it:

    python -P -m simulations.launch.warm_template flwr-clientapp -- flower-supernode ...
    python -P -m simulations.launch.warm_template flwr-simulation -- flower-superlink ...

It makes a private folder (0700) with a Unix socket and a script named for the command
(:mod:`.warm_template_script`, first on the started process's ``PATH``), forks the
template, which imports :attr:`WarmCommand.preload` (never privfed's own packages: the
app comes from the task's FAB), and execs the command (same PID). Per task the script
hands over its argv, environment, folder and standard streams; the template forks a
child that runs Flower's own entry point with them and reports its PID and exit code.

Still one fresh process per task: a child has only the template's imports. Python's,
NumPy's and torch's global random state is drawn again in each child (privfed's DP
randomness uses ``os.urandom`` anyway); what the imports set in the environment is set
again. Only this user's connections are served (``SO_PEERCRED``); a silent caller is
dropped after :data:`REQUEST_TIMEOUT_S`. The template exits with its parent
(``PR_SET_PDEATHSIG``) and removes its folder; a crashed one leaves it, so later
scripts say so and run the stock command cold; where a template cannot work (noexec
temporary folder, socket path too long) the command starts without one, saying so.
docs/deployment.md, "Warm ClientApp processes", has the details.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from simulations.launch.forked import die_with_parent, fresh_random_state
from simulations.launch.warm_template_script import (
    FORWARDED,
    MAX_REQUEST,
    STANDARD_STREAMS,
    Request,
    socket_env,
)

MODULE = "simulations.launch.warm_template"
SCRIPT_MODULE = "simulations.launch.warm_template_script"
SOCKET_NAME = "template.sock"
FOLDER_PREFIX = "privfed-warm-"
# The app's own packages (what the ServerApp and ClientApp import, and what a FAB
# holds): always imported in the child, from the FAB it pulls, never preloaded.
APP_PACKAGES = ("common", "client", "server")


@dataclass(frozen=True)
class WarmCommand:
    """A Flower console script a template can stand in for."""

    name: str  # what the SuperExec starts from PATH
    entry: str  # "module:function", Flower's own entry point the child calls
    preload: tuple[str, ...]  # what its start-up imports (third-party only)
    # "module:function" returning more to import, read from the environment when the
    # template starts (the simulation engine chosen), or "" for none
    more_preload: str = ""

    def __post_init__(self) -> None:
        for ref in (self.entry, self.more_preload):
            module, _, function = ref.partition(":")
            if ref and (not module or not function.isidentifier()):
                raise ValueError(f"expected 'module:function', got {ref!r}")
        if not self.entry:
            raise ValueError("a warm command needs an entry point")

    def modules(self) -> tuple[str, ...]:
        """What the template imports: ``preload``, then what ``more_preload`` names."""
        if not self.more_preload:
            return self.preload
        module, _, function = self.more_preload.partition(":")
        more: tuple[str, ...] = getattr(importlib.import_module(module), function)()
        return (*self.preload, *more)


CLIENTAPP = WarmCommand(
    "flwr-clientapp",
    "flwr.supernode.cli.flwr_clientapp:flwr_clientapp",
    ("flwr.supernode.cli.flwr_clientapp", "torch", "numpy", "scipy.special"),
)
# A simulation run: Flower's simulation engine, what the ServerApp imports, and what
# the chosen engine imports (Ray, or the process engine's workers' modules); Flower's
# entry point with that engine (simulations/engine).
SIMULATION = WarmCommand(
    "flwr-simulation",
    "simulations.engine.flwr_simulation:flwr_simulation",
    ("flwr.simulation.app", "flwr.simulation.run_simulation", "torch", "numpy",
     "scipy.special", "cryptography.hazmat.primitives.hashes"),
    "simulations.engine.flwr_simulation:engine_preload",
)  # fmt: skip
COMMANDS: dict[str, WarmCommand] = {c.name: c for c in (CLIENTAPP, SIMULATION)}
REQUEST_TIMEOUT_S = 2.0  # for a connected script to send its request
STALE_AFTER_S = 60.0  # a folder of ours this old whose socket refuses is left over
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the final NUL


def wrapper_args(command: WarmCommand) -> list[str]:
    """The prefix that starts a command (a SuperNode's, a SuperLink's) with a
    template for ``command`` beside it."""
    return [sys.executable, "-P", "-m", MODULE, command.name, "--"]  # -P: as a script


# --- the template ---------------------------------------------------------------------


def _write_shim(folder: Path, command: WarmCommand) -> None:
    script = folder / command.name
    script.write_text(
        f"#!{sys.executable} -P\n"
        "import sys\n"
        f"from {SCRIPT_MODULE} import shim_main\n"
        f"sys.exit(shim_main({command.name!r}))\n"
    )
    script.chmod(0o700)


def _preload(command: WarmCommand) -> dict[str, str]:
    """Import the command's modules; return the environment variables the imports set
    (``flwr.simulation.app`` sets one for Ray), which a cold process would have too."""
    before = dict(os.environ)
    for name in command.modules():
        importlib.import_module(name)
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in APP_PACKAGES)
    if leaked:  # Flower would reuse them instead of importing the FAB's code
        raise RuntimeError(f"the template imported the app's own modules: {leaked}")
    return {k: v for k, v in os.environ.items() if before.get(k) != v}


class _Template:
    """Serve fork requests on ``listener`` until our parent (the node) is gone."""

    def __init__(
        self,
        listener: socket.socket,
        parent: int,
        command: WarmCommand,
        imported_env: dict[str, str],
    ) -> None:
        self.listener = listener
        self.parent = parent
        self.command = command
        self.imported_env = imported_env  # what the imports set: a child sets it again
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> conn, pid
        self.conns: dict[int, tuple[socket.socket, int]] = {}  # conn fd -> conn, pid

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        while os.getppid() == self.parent:
            for key, _ in self.selector.select(timeout=1.0):
                # an earlier event of this batch may have closed this one's fd
                if key.data == "accept":
                    self._accept()
                elif key.data == "child" and key.fd in self.children:
                    self._reap(key.fd)
                elif key.data == "conn" and key.fd in self.conns:
                    self._hung_up(key.fd)

    def _say(self, what: str) -> None:
        print(f"warm {self.command.name} template: {what}", file=sys.stderr, flush=True)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as err:  # e.g. out of file descriptors: this request only
            self._say(str(err))
            return
        try:
            self._fork_for(conn)
        except OSError as err:  # fork or pidfd_open failed: the script is told (EOF)
            self._say(str(err))
            conn.close()

    def _fork_for(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)  # a silent caller must not hold up the rest
        size = struct.calcsize("3i")
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
        _, uid, _ = struct.unpack("3i", creds)
        fds: list[int] = []
        try:
            if uid != os.getuid():
                raise PermissionError(f"refused a request from uid {uid}")
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, len(STANDARD_STREAMS))
            if len(fds) != len(STANDARD_STREAMS):
                raise ValueError(f"expected 3 standard streams, got {len(fds)}")
            request = Request.decode(data)
        except (OSError, ValueError) as err:
            self._say(str(err))
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        try:
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        if pid == 0:
            self._become_command(request, fds, conn)
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
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
        """The script went away (killed) before its child ended: kill the child too.

        SIGKILL, not SIGTERM: whoever killed the script already gave the task its
        SIGTERM through it. A stopped ``flwr-simulation`` runs Flower's exit for
        seconds while its ServerApp thread goes on with rounds, which a launcher
        that has summarised the run must not see written afterwards."""
        conn, pid = self.conns.pop(fd)
        self.selector.unregister(conn)
        conn.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _become_command(
        self, request: Request, fds: list[int], own: socket.socket
    ) -> NoReturn:
        """In the forked child: become ``<command> <argv>``; never return."""
        code: int = 1
        try:
            # the dispositions a fresh interpreter starts with
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()
            self.listener.close()
            own.close()
            for conn, _ in self.conns.values():
                conn.close()
            for pidfd in self.children:
                os.close(pidfd)
            for target, fd in zip(STANDARD_STREAMS, fds, strict=True):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request.cwd)
            os.environ.clear()
            os.environ.update(request.env)
            os.environ.update(self.imported_env)  # as its own imports would have
            fresh_random_state()
            # as the console script has it: its own folder first, not the template's
            sys.path.insert(0, str(Path(sys.executable).parent))
            # Flower tells its commands apart by argv[0] (its exit messages)
            sys.argv = [self.command.name, *request.argv]
            module, _, function = self.command.entry.partition(":")
            getattr(importlib.import_module(module), function)()
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


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _send(conn: socket.socket, value: dict[str, int]) -> None:
    try:
        conn.send(json.dumps(value).encode())
    except OSError:
        pass  # the script is gone; the child was or will be ended


def _unusable(folder: Path) -> str | None:
    """Why the template cannot work from ``folder``, or None."""
    if len(str(folder / SOCKET_NAME)) > MAX_SOCKET_PATH:
        return f"the socket path {folder / SOCKET_NAME} is too long for a Unix socket"
    if os.statvfs(folder).f_flag & os.ST_NOEXEC:
        return f"{folder} is on a noexec file system: the script could not be started"
    return None


def _remove_stale_folders(root: Path) -> None:
    """Remove this user's folders left by templates that were killed (SIGKILL)."""
    now = time.time()
    for folder in root.glob(f"{FOLDER_PREFIX}*"):
        try:
            info = folder.stat()
            if info.st_uid != os.getuid() or now - info.st_mtime < STALE_AFTER_S:
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(folder / SOCKET_NAME))
                continue  # a live template
            except (ConnectionRefusedError, FileNotFoundError):
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                probe.close()
        except OSError:
            continue


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Fork the template for the named command, then become the command after ``--``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or args[0] not in COMMANDS:
        print(
            f"usage: python -P -m {MODULE} {{{','.join(COMMANDS)}}} -- <command to start>",
            file=sys.stderr,
        )
        sys.exit(2)
    warm, command = COMMANDS[args[0]], args[2:]
    root = Path(tempfile.gettempdir())
    _remove_stale_folders(root)
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=root))  # mode 0700
    why = _unusable(folder)
    if why is not None:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"warm {warm.name}: {why}; starting {command[0]} without a template",
              file=sys.stderr, flush=True)  # fmt: skip
        os.execvp(command[0], command)
    _write_shim(folder, warm)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(folder / SOCKET_NAME))
    listener.listen(16)
    parent = os.getpid()
    # held back until the template's handler is set, so a stop always removes the folder
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    if os.fork() == 0:
        _run_template(listener, folder, parent, warm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    listener.close()
    env = dict(os.environ)
    env[socket_env(warm.name)] = str(folder / SOCKET_NAME)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    os.execvpe(command[0], command, env)


def _run_template(
    listener: socket.socket, folder: Path, parent: int, command: WarmCommand
) -> NoReturn:
    """The template's whole life: import, serve, and remove the folder when stopped.

    A crash leaves the folder, so that every later script says the template is
    unreachable before it runs cold, rather than silently finding the stock one.
    """
    code, remove = 0, True
    try:
        for signum in FORWARDED:
            signal.signal(signum, _exit_on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        _close_inherited(listener.fileno())
        die_with_parent(parent)
        imported_env = _preload(command)
        _Template(listener, parent, command, imported_env).serve()
    except SystemExit:
        pass  # stopped, or its node is gone
    except BaseException:  # noqa: BLE001 - reported; the scripts then run cold
        traceback.print_exc()
        code, remove = 1, False
    finally:
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(code)


def _close_inherited(keep: int) -> None:
    """Close what the launcher left open: a fresh process would not have it."""
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


if __name__ == "__main__":
    main()
