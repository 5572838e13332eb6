"""σ calibrations remembered on this machine, each checked again before it is used.

Why: calibrating σ (Opacus' bisection, some 15 ε evaluations) costs 0.5-1.7 CPU-s at
the sampling rates of small shards, and the very same calibration is made by the
launcher's preflight, by every node's first message of a run, and again in every run
of a sweep or a test suite with the same settings. Its result depends only on the
target ε, δ, q, the steps, the tolerance and the accountant's code.

Why it cannot weaken privacy: a remembered σ is used only after the accountant itself
has found ε(σ) within the target (one evaluation). A stale, damaged or planted entry
can cost utility (a larger σ than needed) but never privacy: an entry that fails the
check is warned about, calibrated again and replaced. An ε that is reported or
charged is never read from here; the ledger computes it from the σ used.

Where: ``$PRIVFED_CACHE_DIR/noise-calibration``, else ``$XDG_CACHE_HOME/privfed/...``,
else ``~/.cache/privfed/...``; one small JSON file per calibration, named by the
SHA-256 of what it depends on, written whole (temp file and rename). A folder that
cannot be written costs the time, not the run (warned once per process).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from common.atomic_files import atomic_write_bytes

log = logging.getLogger(__name__)
CACHE_ENV = "PRIVFED_CACHE_DIR"
FOLDER = "noise-calibration"
FORMAT = 1
_warned: set[str] = set()


def cache_dir() -> Path:
    """``$PRIVFED_CACHE_DIR``, else the user's XDG cache folder, plus ``FOLDER``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "privfed")
    return Path(root) / FOLDER


@lru_cache(maxsize=8)
def _code_fingerprint(accountant_module: str) -> str | None:
    """The accountant module's source, this module's and the pinned libraries'
    versions; ``None`` for an accountant without a source file (never remembered)."""
    digest = hashlib.sha256()
    for name in (accountant_module, __name__):
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        source = getattr(module, "__file__", None)
        if not source or not Path(source).is_file():
            return None
        digest.update(name.encode() + b"\0" + Path(source).read_bytes())
    for package in ("opacus", "prv-accountant", "scipy", "numpy"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{package}={version}".encode())
    return digest.hexdigest()


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning(message)


def remembered_sigma(
    inputs: dict[str, float | int | str],
    accountant_module: str,
    target_epsilon: float,
    calibrate: Callable[[], float],
    epsilon_at: Callable[[float], float],
) -> float:
    """σ for ``inputs``: a remembered one whose ``epsilon_at(σ)`` is within
    ``target_epsilon``, else ``calibrate()`` (then remembered)."""
    code = _code_fingerprint(accountant_module)
    if code is None:
        return calibrate()
    key = {**inputs, "format": FORMAT, "code": code}
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()}.json"
    try:
        entry = json.loads(path.read_text())
        sigma = float(entry["sigma"])
        if entry.get("key") != key or not sigma > 0:
            raise ValueError("the entry is not for these settings")
        if epsilon_at(sigma) <= target_epsilon:
            return sigma
        log.warning(
            "remembered σ %s in %s gives ε above the target %s; calibrating again",
            sigma, path, target_epsilon,
        )  # fmt: skip
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("calibration cache entry %s is unusable (%s); replacing it", path, exc)
    sigma = calibrate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"key": key, "sigma": sigma}).encode(), 0o600)
    except OSError as exc:
        _warn_once(
            str(path.parent),
            f"cannot remember σ calibrations in {path.parent} ({exc}); each one is "
            f"computed again (set {CACHE_ENV} to a writable folder)",
        )
    return sigma
