"""Atomic writes: whole files, durable before the caller goes on, or synced together."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from common import atomic_files
from common.atomic_files import atomic_write_bytes, deferred_sync


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        atomic_files.os, "fsync", lambda fd: (seen.append("fsync"), real_fsync(fd))[1]
    )
    monkeypatch.setattr(atomic_files.os, "sync", lambda: seen.append("sync"))
    return seen


def test_a_write_is_fsynced_file_and_folder(tmp_path: Path, calls: list[str]) -> None:
    atomic_write_bytes(tmp_path / "a" / "f.json", b"one")
    assert (tmp_path / "a" / "f.json").read_bytes() == b"one"
    assert calls == ["fsync", "fsync"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.json"]  # no temp left


def test_deferred_writes_are_whole_and_synced_once_at_the_end(
    tmp_path: Path, calls: list[str]
) -> None:
    """A simulated SuperNode's group: 3 ledgers written, one sync, before it returns."""
    with deferred_sync():
        for i in range(3):
            atomic_write_bytes(tmp_path / f"p{i}.json", f"ledger {i}".encode())
            assert (tmp_path / f"p{i}.json").read_bytes() == f"ledger {i}".encode()
        assert calls == []  # nothing synced yet inside the block
    assert calls == ["sync"]
    atomic_write_bytes(tmp_path / "after.json", b"x")  # durable again on its own
    assert calls == ["sync", "fsync", "fsync"]


def test_the_block_syncs_even_when_it_fails(tmp_path: Path, calls: list[str]) -> None:
    with pytest.raises(RuntimeError), deferred_sync():
        atomic_write_bytes(tmp_path / "p.json", b"written")
        raise RuntimeError("a client's handler failed")
    assert calls == ["sync"] and (tmp_path / "p.json").read_bytes() == b"written"


def test_a_leftover_temp_name_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed process with this PID left its temp file: the write draws another
    name, leaves the leftover alone, and still lands whole with its mode."""
    monkeypatch.setattr(atomic_files, "_TEMP_NUMBERS", iter([7, 8]))
    leftover = tmp_path / f".f.json.{os.getpid()}-{threading.get_ident()}-7"
    leftover.write_bytes(b"half a ledger")
    atomic_write_bytes(tmp_path / "f.json", b"whole", mode=0o600)
    assert (tmp_path / "f.json").read_bytes() == b"whole"
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o600
    assert leftover.read_bytes() == b"half a ledger"
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "f.json"]
    atomic_write_bytes(tmp_path / "f.json", b"again")  # the next number is free
    assert (tmp_path / "f.json").read_bytes() == b"again"
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_a_missing_folder_is_made_and_a_failed_write_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "new" / "deeper" / "f.json"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
