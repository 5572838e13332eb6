"""Write files so that a crash leaves the old version or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# Set inside deferred_sync(): writes skip their own fsyncs; one sync covers them all.
_DEFERRED: ContextVar[bool] = ContextVar("privfed_deferred_sync", default=False)


@contextmanager
def deferred_sync() -> Iterator[None]:
    """Atomic writes in this block skip their own fsyncs; leaving it syncs once.

    For a simulated SuperNode that answers for many virtual clients in one message
    (client/virtual_clients.py): each client's ledger is still renamed into place
    whole, and all of them are on disk (``os.sync``) before the block ends, so before
    the group's reply (and any update in it) leaves. A power cut inside the block
    may lose or reorder the block's writes, as it could lose the reply.
    """
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
        os.sync()


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file in the same folder, fsync, rename, then fsync the folder
    (the fsyncs wait for the end of an enclosing :func:`deferred_sync`)."""
    durable = not _DEFERRED.get()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
