"""Write files so that a crash leaves the old version or the new one, never half."""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# Set inside deferred_sync(): writes skip their own fsyncs; one sync covers them all.
_DEFERRED: ContextVar[bool] = ContextVar("privfed_deferred_sync", default=False)
_TEMP_NUMBERS = itertools.count()  # this process's temp names: unique without a draw
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


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
    fd, tmp = _temp_file(path)
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


def _temp_file(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` (its folder made if missing), owner-only for now.

    Named by process, thread and a counter, so no other writer can hold the name; a
    leftover of a crashed process with the same PID makes the name taken, and then
    ``mkstemp`` draws one. A simulated SuperNode writes two such files per client:
    ``mkstemp``'s random draw and a ``mkdir`` of a folder that exists cost a fifth of
    each write.
    """
    name = f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_TEMP_NUMBERS)}"
    tmp = path.parent / name
    try:
        return os.open(tmp, _TEMP_FLAGS, 0o600), str(tmp)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
