"""A node's prepared shard on disk: built by its first message, memory-mapped by the rest.

On a SuperNode every message runs in a fresh ClientApp process, so without this
each message would read, check, partition and featurise its data again (with
ScatterNet about 15 CPU-s per 6,000 images). An entry is a folder
``<node folder>/shard-cache/<key>/`` holding one ``.npy`` file per array and a
``manifest.json`` with each file's SHA-256, shape and dtype.

- **Key.** The caller's key is a hash of everything the arrays are made from (the
  source files' SHA-256, the settings, the code and library versions), so a changed
  data file or setting names another entry, never a stale one.
- **Atomic.** An entry is written into a hidden temporary folder and renamed into
  place, so readers see a whole entry or none. Entries are immutable; a node keeps
  only its newest one.
- **Verified.** Every read checks every file against the manifest's SHA-256 (about
  60 ms per 100 MB here) before its arrays are used; a damaged entry raises
  :class:`CacheDamaged` and the caller rebuilds it. Nothing is fsynced: after a
  crash an entry is either intact or fails that check.

Arrays come back memory-mapped copy-on-write: writable (torch takes them as they
are), shared with the page cache, and never written back to the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CACHE_DIR = "shard-cache"
FORMAT = "privfed-shard-cache/1"
MANIFEST = "manifest.json"
STALE_TEMP_SECONDS = 3600.0  # a temporary folder this old was left by a crashed writer
_FILE_MODE = 0o600  # the node's own data: readable by its owner only
_DIR_MODE = 0o700
_MAX_HEADER = 65536 + 12  # the longest .npy header numpy writes (format 1.0)
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


class CacheDamaged(RuntimeError):
    """A cache entry exists but does not match its manifest."""


def file_sha256(path: Path, remember: bool = False) -> str:
    """SHA-256 of a file's content.

    With ``remember``, once per process for each (size, mtime, inode) state of the
    file: for the run's dataset files, which a long-lived simulation worker would
    otherwise read again for every message. A node's own data is hashed every time
    (a file rewritten within one clock tick keeps its mtime).
    """
    st = path.stat()
    signature = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    digest = _DIGESTS.get(signature) if remember else None
    if digest is None:
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if remember:
            _DIGESTS[signature] = digest
    return digest


def _map_npy(path: Path, expected_sha256: str) -> np.ndarray:
    """The array in ``path``, memory-mapped copy-on-write, if the file hashes right."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise CacheDamaged(f"{path.name} is empty")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    if hashlib.sha256(mapped).hexdigest() != expected_sha256:
        raise CacheDamaged(f"{path.name} does not match its SHA-256 in the manifest")
    stream = io.BytesIO(mapped[:_MAX_HEADER])
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise CacheDamaged(f"{path.name} has no valid .npy header: {exc}") from None
    offset = stream.tell()
    if dtype.hasobject:
        raise CacheDamaged(f"{path.name} holds Python objects")
    if offset + int(np.prod(shape)) * dtype.itemsize != len(mapped):
        raise CacheDamaged(f"{path.name}: its size does not match its header")
    return np.ndarray(
        shape, dtype=dtype, buffer=mapped, offset=offset, order="F" if fortran else "C"
    )


def read_entry(
    root: Path, key: str, names: tuple[str, ...]
) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, each verified; ``None`` if there is no entry.

    Raises :class:`CacheDamaged` if the entry exists but any part of it is wrong.
    """
    entry = root / key
    if not entry.is_dir():
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheDamaged(f"its manifest is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheDamaged("its manifest is not a privfed shard-cache manifest")
    if manifest.get("key") != key:
        raise CacheDamaged("its manifest names another key")
    stored = manifest.get("arrays")
    if not isinstance(stored, dict) or sorted(stored) != sorted(names):
        raise CacheDamaged("its manifest lists other arrays")
    arrays = {}
    for name in names:
        info = stored[name]
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise CacheDamaged(f"its manifest entry for {name!r} is malformed")
        try:
            array = _map_npy(entry / f"{name}.npy", info["sha256"])
        except OSError as exc:
            raise CacheDamaged(f"{name}.npy is unreadable: {exc}") from None
        if list(array.shape) != info.get("shape") or str(array.dtype) != info.get("dtype"):
            raise CacheDamaged(f"{name}.npy is not shaped as its manifest says")
        arrays[name] = array
    return arrays


def _remove(folder: Path) -> None:
    """Delete ``folder``: renamed away first, so no reader sees it half deleted."""
    trash = folder.with_name(f".trash-{secrets.token_hex(6)}")
    try:
        folder.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def discard_entry(root: Path, key: str) -> None:
    """Remove a (damaged) entry."""
    _remove(root / key)


def write_entry(
    root: Path,
    key: str,
    arrays: Mapping[str, np.ndarray],
    description: Mapping[str, Any],
) -> Path:
    """Store ``arrays`` under ``key`` atomically and drop the root's other entries.

    ``description`` goes into the manifest for people reading the folder. If another
    process stored the same key first, its entry is kept.
    """
    root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    temp = root / f".tmp-{secrets.token_hex(8)}"
    temp.mkdir(mode=_DIR_MODE)
    try:
        stored = {}
        for name, array in arrays.items():
            path = temp / f"{name}.npy"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            with open(fd, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            stored[name] = {
                "sha256": digest,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }
        manifest = {"format": FORMAT, "key": key, "arrays": stored, **description}
        manifest_path = temp / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        manifest_path.chmod(_FILE_MODE)
        try:
            temp.rename(root / key)
        except OSError:  # the same key stored meanwhile by another message: keep it
            if not (root / key).is_dir():
                raise
            _remove(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _prune(root, keep=key)
    return root / key


def _prune(root: Path, keep: str) -> None:
    """Drop the node's older entries and temporary folders left by crashed writers."""
    now = time.time()
    for child in root.iterdir():
        if child.name == keep or not child.is_dir():
            continue
        if child.name.startswith("."):
            try:
                if now - child.stat().st_mtime < STALE_TEMP_SECONDS:
                    continue  # another message may be writing it right now
            except FileNotFoundError:
                continue
        _remove(child)
