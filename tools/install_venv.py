"""Install the project into a virtual environment with uv, from pip's own settings.

Why: ``pip install`` of the pinned set (torch, Ray, pyarrow, transformers: 2.3 GB
unpacked and byte-compiled) took 56 s of a 10-minute CI run on 2 cores; uv installs
the same pins, byte-compiled, in about 27 s (BENCHMARKS.md, "Test suite").

uv does not read pip's configuration, and the machines this runs on find their
packages through it (local wheel folders, mirror indexes, a site constraint file).
So pip's effective settings (``pip config list``: files and ``PIP_*`` variables, in
pip's own precedence) are translated into uv's options. A setting with no
translation here, or a failing uv, is reported on one line and pip installs
instead: slower, never different.

    python3 tools/install_venv.py .venv -c constraints.txt -e ".[dev,tabular,text]"

The venv must exist; uv itself is installed into it with pip first (it is pinned in
``constraints.txt``, and is a dependency of the project's runtime anyway).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

# pip settings with nothing to translate: they change how pip talks, not what it installs
HARMLESS = {"disable-pip-version-check", "no-color", "progress-bar", "root-user-action"}
PREFIX = "[install]"


# pip's precedence for ``pip install``: PIP_* variables, then a file's [install]
# section, then its [global] one (``pip config list`` prints them in an order that
# changed between pip releases). Other sections are other commands'.
SECTION_RANK = {":env:": 3, "install": 2, "global": 1}


def pip_settings(python: Path) -> dict[str, str]:
    """pip's effective settings for ``pip install``: key (without section) to value."""
    out = subprocess.run(
        [str(python), "-m", "pip", "config", "list"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    ranked: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        rank = SECTION_RANK.get(section, 0)
        if rank and rank >= ranked.get(name, (0, ""))[0]:
            ranked[name] = (rank, value.strip().strip("'\""))
    return {name: value for name, (_, value) in ranked.items()}


def uv_options(settings: dict[str, str]) -> tuple[list[str], dict[str, str]] | str:
    """uv's arguments and environment for pip's settings, or why there are none."""
    args: list[str] = ["--index-strategy", "unsafe-best-match"]  # as pip: every index
    env: dict[str, str] = {}
    for key, value in settings.items():
        values = value.split()
        if key == "index-url":
            args += ["--index-url", value]
        elif key == "extra-index-url":
            for url in values:
                args += ["--extra-index-url", url]
        elif key == "find-links":
            for where in values:
                args += ["--find-links", where]
        elif key == "constraint":
            for path in values:
                args += ["--constraint", path]
        elif key == "no-index":
            if value.lower() in ("1", "true", "yes", "on"):
                args.append("--no-index")
        elif key == "trusted-host":
            for host in values:
                args += ["--allow-insecure-host", host]
        elif key == "cert":
            env["SSL_CERT_FILE"] = value
        elif key in ("timeout", "default-timeout"):
            env["UV_HTTP_TIMEOUT"] = value
        elif key not in HARMLESS:
            return f"pip setting {key!r} has no uv translation here"
    return args, env


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    venv, install = Path(argv[0]), argv[1:]
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    constraints = install[install.index("-c") + 1] if "-c" in install else None
    bootstrap = [*pip, *(["-c", constraints] if constraints else []), "uv"]
    subprocess.run(bootstrap, check=True)
    options = uv_options(pip_settings(python))
    if isinstance(options, str):
        print(f"{PREFIX} {options}: installing with pip", flush=True)
    else:
        args, env = options
        uv = [
            str(venv / "bin" / "uv"), "pip", "install", "--quiet", "--compile-bytecode",
            "--python", str(python), *args, *install,
        ]  # fmt: skip
        done = subprocess.run(uv, env={**os.environ, **env})
        if done.returncode == 0:
            return 0
        print(
            f"{PREFIX} uv failed (exit {done.returncode}): {shlex.join(uv)}; "
            "installing with pip",
            flush=True,
        )
    return subprocess.run([*pip, *install]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
