"""A TCP proxy that injects delay, stalls and connection resets, per client address.

This kernel has no ``netem`` (``tc qdisc add ... netem``: "Specified qdisc kind
is unknown"), and no iptables or nft to drop packets, so latency and loss are
made one layer up: nodes reach nginx through this proxy, which for each peer
address can

* **delay** every byte by a fixed latency (a timed queue, so throughput stays),
* **stall** a connection (hold its bytes until the stall ends: a black hole that
  TCP itself never notices),
* **drop** it: reset (RST) the peer's open connections, and reset each new one
  at once, as a lossy link makes a TCP peer give up.

Rules live in a JSON file the proxy re-reads when it changes, e.g.
``{"10.1.2.11": {"delay_ms": 200, "stalled": false, "dropped": false}}``; the
harness (``simulations.deployment.faults``) writes it with an atomic rename.
TLS passes through untouched (the proxy never sees plaintext).

    python -m simulations.deployment.tcp_faults --listen 10.1.2.2:443 \
        --upstream 127.0.0.1:8443 --rules rules.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 65536
RULES_POLL_S = 0.1


@dataclass(frozen=True)
class Rule:
    """What happens to one peer's connections now."""

    delay_ms: int = 0
    stalled: bool = False
    dropped: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.delay_ms <= 600_000:
            raise ValueError(
                f"rule key 'delay_ms' must be in [0, 600000], got {self.delay_ms}"
            )

    @classmethod
    def from_mapping(cls, data: dict[str, object]) -> Rule:
        """A rule from its JSON form; unknown keys are refused, naming them."""
        unknown = set(data) - {"delay_ms", "stalled", "dropped"}
        if unknown:
            raise ValueError(f"unknown rule key(s): {sorted(unknown)}")
        return cls(
            int(data.get("delay_ms", 0)),  # type: ignore[call-overload]
            bool(data.get("stalled", False)),
            bool(data.get("dropped", False)),
        )


def read_rules(path: Path) -> dict[str, Rule]:
    """The rules file as ``{peer address: Rule}``; a missing file means no faults."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {peer: Rule.from_mapping(rule) for peer, rule in data.items()}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (linger 0), as a broken link looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """Forward every connection to ``upstream`` under its peer's current rule."""

    def __init__(self, upstream: tuple[str, int], rules_file: Path) -> None:
        self.upstream = upstream
        self.rules_file = rules_file
        self.rules: dict[str, Rule] = {}
        self.open: dict[str, set[asyncio.StreamWriter]] = {}
        self.counts = {"connections": 0, "reset": 0}
        self._mtime: float | None = None

    def rule(self, peer: str) -> Rule:
        """The rule for ``peer`` (no fault when it has none)."""
        return self.rules.get(peer, Rule())

    async def watch_rules(self) -> None:
        """Reload the rules when the file changes; reset the newly dropped peers."""
        while True:
            try:
                mtime = self.rules_file.stat().st_mtime
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self.rules = read_rules(self.rules_file)
                except (ValueError, OSError) as exc:
                    print(f"tcp_faults: rules not applied: {exc}", file=sys.stderr)
                for peer, writers in self.open.items():
                    if self.rule(peer).dropped:
                        for writer in list(writers):
                            self.counts["reset"] += 1
                            _reset(writer)
            await asyncio.sleep(RULES_POLL_S)

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client connection: reset it, or pipe it both ways under the rule."""
        peer = str(writer.get_extra_info("peername")[0])
        self.counts["connections"] += 1
        if self.rule(peer).dropped:
            self.counts["reset"] += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        ours = self.open.setdefault(peer, set())
        ours.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(peer, reader, up_writer), self._pipe(peer, up_reader, writer)
            )
        finally:
            ours.difference_update((writer, up_writer))
            for w in (writer, up_writer):
                if self.rule(peer).dropped:
                    _reset(w)
                else:
                    w.close()

    async def _pipe(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Copy bytes, each released ``delay_ms`` after it arrived, none while stalled."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(CHUNK):
                    await queue.put((time.monotonic(), data))
            except (ConnectionError, OSError):
                pass
            await queue.put((time.monotonic(), b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                arrived, data = await queue.get()
                rule = self.rule(peer)
                wait = arrived + rule.delay_ms / 1000 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                while self.rule(peer).stalled and not self.rule(peer).dropped:
                    await asyncio.sleep(RULES_POLL_S)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            reading.cancel()


async def serve(listen: tuple[str, int], proxy: FaultProxy) -> None:
    """Serve until cancelled."""
    server = await asyncio.start_server(proxy.handle, *listen)
    print(f"tcp_faults: {listen[0]}:{listen[1]} -> {proxy.upstream}", flush=True)
    async with server:
        await asyncio.gather(server.serve_forever(), proxy.watch_rules())


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_address, required=True)
    p.add_argument("--upstream", type=_address, required=True)
    p.add_argument("--rules", type=Path, required=True, help="JSON rules file")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.listen, FaultProxy(args.upstream, args.rules)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
