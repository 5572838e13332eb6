"""What a process forked from a warm parent redoes so that it is as fresh as a started one.

Shared by the warm template's per-task children (:mod:`.warm_template`) and the
process engine's ClientApp workers (:mod:`simulations.engine.process_workers`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` when the parent exits; exit 0 at once if it
    already has (it died before the request took effect)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(0)


def fresh_random_state() -> None:
    """Draw again what a copied process would share with its siblings."""
    import random

    random.seed()  # Python also does this after os.fork(); kept explicit
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # the legacy global generator, from OS entropy
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()  # a fresh process's default generator starts from a random seed


def name_process(name: str) -> None:
    """Set the name ``ps`` and ``/proc/PID/comm`` show (at most 15 bytes), so that a
    forked process is told apart from the parent whose command line it keeps."""
    encoded = name.encode()
    if len(encoded) > 15:
        raise ValueError(f"a process name has at most 15 bytes, got {name!r}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0)
