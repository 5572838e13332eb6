"""Flower's task processes forked from a warm template (launch/warm_template.py).

A stand-in SuperNode (a short script) is started the way local deployments start
one, and runs ``flwr-clientapp`` by name from its ``PATH`` as Flower's SuperExec
does. Flower's own ``flwr_clientapp()`` then runs in a child of the template. The
``flwr-simulation`` template is exercised end to end by every simulation test (the
launcher starts its SuperLink under one); here its entry point is checked the same
way as the ClientApp's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from common.privacy.randomness import round_generator
from simulations.launch import warm_template
from simulations.launch.forked import fresh_random_state
from simulations.launch.warm_template import (
    CLIENTAPP,
    FOLDER_PREFIX,
    MODULE,
    SCRIPT_MODULE,
    SIMULATION,
    WarmCommand,
    wrapper_args,
)
from simulations.launch.warm_template_script import Request, next_on_path, socket_env

SOCKET_ENV = socket_env(CLIENTAPP.name)

# The stand-in SuperNode: run flwr-clientapp from PATH the way the SuperExec does,
# and report what happened as one JSON line.
SUPERNODE = textwrap.dedent(
    """
    import json, os, shutil, subprocess, sys, time
    import psutil

    me = psutil.Process()
    report = {"socket": os.environ.get("%(env)s"), "shim": shutil.which("flwr-clientapp")}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the template is a child of this process
        kids = [p for p in me.children() if "%(module)s" in " ".join(p.cmdline())]
        if kids:
            break
        time.sleep(0.05)
    report["template"] = kids[0].pid if kids else None
    bogus = ["--token", "x", "--no-such-option"]
    for name, args in (("help", ["--help"]), ("bogus", bogus)):
        done = subprocess.run(["flwr-clientapp", *args], capture_output=True, text=True)
        report[name] = [done.returncode, done.stdout, done.stderr]
    print(json.dumps(report), flush=True)
    """
) % {"env": SOCKET_ENV, "module": MODULE}


@pytest.fixture
def temp_root() -> Iterator[Path]:
    """Where the templates make their folders (``TMPDIR``): a short path of its own,
    since a socket path over 107 bytes (pytest's folders can be) means no template."""
    root = Path(tempfile.mkdtemp(prefix="pf-wc-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _start(
    script: str, temp: Path, command: WarmCommand = CLIENTAPP
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*wrapper_args(command), sys.executable, "-c", script],
        cwd=temp,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_clientapp_runs_forked_with_its_streams_and_exit_codes(temp_root: Path) -> None:
    """The node keeps the wrapper's PID; ``flwr-clientapp`` on its PATH is the script
    in the template's private folder; Flower's CLI answers through the script's own
    stdout/stderr with its own exit codes (0 for --help, 2 for a bad option); the
    template ends with its node and removes its folder."""
    node = _start(SUPERNODE, temp_root)
    out, err = node.communicate(timeout=120)
    assert node.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    folder = Path(report["socket"]).parent
    assert report["shim"] == str(folder / "flwr-clientapp")
    assert report["template"] is not None
    code, stdout, stderr = report["help"]
    assert code == 0 and "usage:" in stdout and "--runtime-api-address" in stdout
    assert "unreachable" not in stderr  # not the cold fallback
    code, stdout, stderr = report["bogus"]
    assert code == 2 and "unrecognized arguments: --no-such-option" in stderr
    assert _gone(report["template"], 15), "the template outlived its SuperNode"
    assert not folder.exists()


def test_the_private_folder_is_the_users_alone(temp_root: Path) -> None:
    """The socket that starts processes as this user sits in a folder nobody else
    may enter (mode 0700)."""
    script = textwrap.dedent(
        f"""
        import os, stat, time
        path = os.environ["{SOCKET_ENV}"]
        while not os.path.exists(path):
            time.sleep(0.05)
        print(oct(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))
        """
    )
    node = _start(script, temp_root)
    out, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    assert out.strip() == "0o700"


def test_sigterm_to_the_script_reaches_flowers_clientapp(temp_root: Path) -> None:
    """A ClientApp that cannot reach its SuperNode retries; SIGTERM to the script the
    SuperExec started stops the forked child through Flower's own handler."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        import psutil
        shim = subprocess.Popen(
            ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9", "--token", "x",
             "--insecure"], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            p.children() for p in psutil.Process().children() if p.pid != shim.pid
        ):
            time.sleep(0.1)
        time.sleep(1.0)  # Flower's handlers are set up
        shim.terminate()
        _, err = shim.communicate(timeout=60)
        print(shim.returncode, file=sys.stderr)
        print(err, file=sys.stderr)
        """
    )
    node = _start(script, temp_root)
    _, err = node.communicate(timeout=120)
    assert node.returncode == 0, err
    assert "Start `flwr-clientapp` process" in err
    assert "Task stopped." in err  # Flower's SIGTERM handler ran in the child


def test_an_unreachable_template_is_reported_and_the_clientapp_runs_cold(
    tmp_path: Path,
) -> None:
    env = {**os.environ, SOCKET_ENV: str(tmp_path / "nothing.sock")}
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; from {SCRIPT_MODULE} import shim_main; "
         "sys.exit(shim_main('flwr-clientapp', ['--help']))"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0
    assert "unreachable" in done.stderr and "cold" in done.stderr
    assert "usage:" in done.stdout


def test_the_template_refuses_to_hold_the_apps_own_modules() -> None:
    """Flower reuses an imported ``client.app`` instead of the FAB's: never preload it."""
    own = WarmCommand("flwr-clientapp", CLIENTAPP.entry, ("common.config",))
    with pytest.raises(RuntimeError, match="app's own modules"):
        warm_template._preload(own)
    with pytest.raises(ValueError, match="module:function"):
        WarmCommand("flwr-clientapp", "flwr.supernode", ())


def test_what_the_imports_set_in_the_environment_is_set_again_in_each_child() -> None:
    """A cold ``flwr-simulation`` gets ``RAY_ENABLE_UV_RUN_RUNTIME_ENV=0`` from its own
    import of Flower's simulation app; a forked one starts from the caller's
    environment, so the template hands on what its imports set (and its preload
    holds none of the app's own modules)."""
    script = (
        "import json, sys\n"
        f"from {MODULE} import SIMULATION, _preload\n"
        "print(json.dumps(_preload(SIMULATION)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    done = subprocess.run(
        [sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    added = json.loads(done.stdout.strip().splitlines()[-1])
    assert added.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") == "0", added


def test_the_simulation_template_runs_flowers_flwr_simulation(temp_root: Path) -> None:
    """``flwr-simulation`` on the PATH of a process started under the simulation
    template is its script, and answers as Flower's own (its --help, exit 0), forked
    warm, not cold; the ClientApp's variable is not set."""
    script = textwrap.dedent(
        f"""
        import json, os, shutil, subprocess
        done = subprocess.run(["flwr-simulation", "--help"], capture_output=True,
                              text=True, timeout=120)
        print(json.dumps({{"shim": shutil.which("flwr-simulation"),
                           "socket": os.environ.get("{socket_env(SIMULATION.name)}"),
                           "clientapp": os.environ.get("{SOCKET_ENV}"),
                           "run": [done.returncode, done.stdout, done.stderr]}}))
        """
    )
    node = _start(script, temp_root, SIMULATION)
    out, err = node.communicate(timeout=180)
    assert node.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["shim"] == str(Path(report["socket"]).parent / "flwr-simulation")
    assert report["clientapp"] is None
    code, stdout, stderr = report["run"]
    assert code == 0 and "--runtime-api-address" in stdout, stderr
    assert "unreachable" not in stderr and "cold" not in stderr


def test_requests_are_validated() -> None:
    req = Request(("--help",), "/tmp", {"A": "1"})
    assert Request.decode(req.encode()) == req
    with pytest.raises(ValueError, match="cwd"):
        Request(("--help",), "relative", {})
    with pytest.raises(ValueError, match="malformed"):
        Request.decode(b"{}")


def _draws_in_forked_children(draw: object, fresh: bool) -> list[float]:
    """What two children forked from this process each draw first."""
    values = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            if fresh:
                fresh_random_state()
            os.write(write, repr(float(draw())).encode())  # type: ignore[operator]
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as fh:
            values.append(float(fh.read()))
        os.waitpid(pid, 0)
    return values


def test_forked_clientapps_do_not_share_random_state() -> None:
    """An observer of two messages' uploads must not find the same randomness in
    both. NumPy's global generator and torch's default one are copied by fork (shown
    without the reset) and drawn again in each child; the DP noise generator is
    seeded from the OS CSPRNG per round, so it differs without any reset."""
    np.random.random()  # the parent's state is what a fork copies
    same = _draws_in_forked_children(np.random.random, fresh=False)
    assert same[0] == same[1]  # what the reset is for
    fresh = _draws_in_forked_children(np.random.random, fresh=True)
    assert fresh[0] != fresh[1]
    import torch

    torch.rand(1)
    same = _draws_in_forked_children(lambda: torch.rand(1).item(), fresh=False)
    assert same[0] == same[1]
    fresh = _draws_in_forked_children(lambda: torch.rand(1).item(), fresh=True)
    assert fresh[0] != fresh[1]
    noise = _draws_in_forked_children(
        lambda: torch.randn(1, generator=round_generator()).item(), fresh=False
    )
    assert noise[0] != noise[1]


def test_a_killed_script_takes_its_child_with_it(temp_root: Path) -> None:
    """The SuperExec's script is SIGKILLed (no forwarding possible): the template
    ends the child it forked for it."""
    script = textwrap.dedent(
        f"""
        import json, signal, subprocess, time
        import psutil
        shim = subprocess.Popen(
            ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9", "--token", "x",
             "--insecure"], stderr=subprocess.DEVNULL)
        me = psutil.Process()
        children = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not children:
            for p in me.children():
                if "{MODULE}" in " ".join(p.cmdline()):
                    children = p.children()
            time.sleep(0.1)
        shim.send_signal(signal.SIGKILL)
        shim.wait()
        gone, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()
        print(json.dumps({{"seen": len(children), "alive": len(alive)}}))
        """
    )
    node = _start(script, temp_root)
    out, err = node.communicate(timeout=120)
    assert node.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"seen": 1, "alive": 0}, "the forked ClientApp outlived its script"


def test_a_silent_caller_does_not_hold_up_the_next_message(temp_root: Path) -> None:
    """A connection that sends nothing is dropped after a timeout; the next
    ``flwr-clientapp`` is forked and answers."""
    script = textwrap.dedent(
        f"""
        import os, socket, subprocess, sys, time
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = os.environ["{SOCKET_ENV}"]
        while True:
            try:
                silent.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        done = subprocess.run(["flwr-clientapp", "--help"], capture_output=True,
                              text=True, timeout=60)
        print(done.returncode, "usage:" in done.stdout, "cold" in done.stderr)
        """
    )
    node = _start(script, temp_root)
    out, err = node.communicate(timeout=120)
    assert node.returncode == 0, err
    assert out.split() == ["0", "True", "False"]


def test_a_clientapp_killed_by_a_signal_is_reported_as_killed(temp_root: Path) -> None:
    """The script ends the way its child ended (SIGKILL here, e.g. the OOM killer),
    so the SuperExec sees what a cold process would show."""
    script = textwrap.dedent(
        f"""
        import signal, subprocess, time
        import psutil
        shim = subprocess.Popen(
            ["flwr-clientapp", "--runtime-api-address", "127.0.0.1:9", "--token", "x",
             "--insecure"], stderr=subprocess.DEVNULL)
        children = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not children:
            for p in psutil.Process().children():
                if "{MODULE}" in " ".join(p.cmdline()):
                    children = p.children()
            time.sleep(0.1)
        children[0].send_signal(signal.SIGKILL)
        print(shim.wait(timeout=60))
        """
    )
    node = _start(script, temp_root)
    out, err = node.communicate(timeout=120)
    assert node.returncode == 0, err
    assert out.strip() == str(-signal.SIGKILL)


def test_folders_left_by_killed_templates_are_removed(temp_root: Path) -> None:
    """A template killed with its node (SIGKILL) cannot remove its folder: the next
    node started removes this user's old folders whose socket nobody serves."""
    temp = temp_root
    stale = temp / f"{FOLDER_PREFIX}old"
    stale.mkdir(mode=0o700)
    (stale / "flwr-clientapp").write_text("#!/bin/sh\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    young = temp / f"{FOLDER_PREFIX}young"  # a node starting right now
    young.mkdir(mode=0o700)
    node = _start("pass", temp_root)
    node.communicate(timeout=60)
    assert not stale.exists()
    assert young.exists()


def test_a_socket_path_too_long_starts_the_node_without_a_template(tmp_path: Path) -> None:
    """A temporary folder deep enough that the socket path cannot be bound: the node
    starts stock (its ClientApps cold), and says why."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    script = f"import os; print(os.environ.get('{SOCKET_ENV}'))"
    node = subprocess.Popen(
        [*wrapper_args(CLIENTAPP), sys.executable, "-c", script],
        cwd=tmp_path, env={**os.environ, "TMPDIR": str(deep)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    assert out.strip() == "None"
    assert "too long for a Unix socket" in err and "without a template" in err
    assert not list(deep.iterdir())


def test_a_cold_start_runs_what_path_names_after_the_shim(tmp_path: Path) -> None:
    """Without its template the shim runs the next ``flwr-simulation`` on PATH, the
    simulation engine's script where the launcher put one (not Flower's own, which
    would run every ClientApp on Ray whatever the engine chosen); Flower's beside
    this Python when PATH has none."""
    shim_folder, engine_bin, empty = tmp_path / "warm", tmp_path / "engine", tmp_path / "e"
    for folder in (shim_folder, engine_bin, empty):
        folder.mkdir()
    shim = shim_folder / "flwr-simulation"
    engine = engine_bin / "flwr-simulation"
    for script in (shim, engine):
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
    (empty / "flwr-simulation").write_text("not executable")
    path = os.pathsep.join([str(shim_folder), str(empty), str(engine_bin), "/usr/bin"])
    assert next_on_path("flwr-simulation", shim, path) == engine
    stock = Path(sys.executable).parent / "flwr-simulation"
    assert next_on_path("flwr-simulation", shim, str(shim_folder)) == stock
