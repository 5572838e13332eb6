"""Which TCP sockets a set of processes listens on, read once per call from /proc.

psutil's ``Process.net_connections`` parses the system's /proc/net tables again for
every process it is asked about: 125 ms of CPU for one pass over 15 processes here,
which the tests' watchers made every 0.3 s beside the federation they watch. This
reads the tables once and matches each process's socket inodes against them (a few
ms). ``tests/simulations/test_listening.py`` checks it against psutil.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
_TABLES = (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6))


def _address(hex_ip: str, family: int) -> str:
    raw = bytes.fromhex(hex_ip)  # the kernel prints each 32-bit word in host order
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, ordered)


def listening_table() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket in this
    process's network namespace."""
    table: dict[str, tuple[str, int]] = {}
    for name, family in _TABLES:
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            hex_ip, hex_port = fields[1].split(":")
            table[fields[9]] = (_address(hex_ip, family), int(hex_port, 16))
    return table


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets ``pid`` holds open (empty if it is gone)."""
    folder = f"/proc/{pid}/fd"
    inodes = set()
    try:
        names = os.listdir(folder)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening(pids: Iterable[int]) -> dict[int, set[tuple[str, int]]]:
    """pid -> the (address, port) pairs it listens on, for those that listen."""
    table = listening_table()
    found: dict[int, set[tuple[str, int]]] = {}
    if not table:
        return found
    for pid in pids:
        mine = {table[inode] for inode in socket_inodes(pid) if inode in table}
        if mine:
            found[pid] = mine
    return found
