"""Fault schedules for the soak, and the injector that plays one against a deployment.

A fault fires during a round: once ``rounds.jsonl`` holds ``round - 1`` records
(round 1: once the run is submitted), plus ``after`` seconds. It is written
``KIND@ROUND[+AFTER|+task][:key=value,...]``, e.g.

    kill@2+5:node=3,down=10        SIGKILL node 3, restart it (same state) 10 s later
    kill@2+task:node=1,down=3      ... as soon as node 1 runs a task in round 2
    freeze@3:node=1,for=30         SIGSTOP node 1 and its ClientApps, SIGCONT after 30 s
    partition@4:nodes=0/1/2,for=60 take the nodes' links down for 60 s (ip link)
    delay@2:node=1,ms=300,for=20   300 ms more latency on node 1's connections (proxy)
    stall@2:node=1,for=20          node 1's bytes held for 20 s (proxy)
    drop@2:node=1,for=20           node 1's connections reset for 20 s (proxy)
    cap@2:node=1,kbit=256,for=60   node 1's link capped at 256 kbit/s (tc tbf)
    superlink-kill@5+10            SIGKILL the SuperLink (the soak then resumes the run)

:func:`random_schedule` draws kills, freezes and a partition from a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields

NODE_FAULTS = ("kill", "freeze", "partition", "delay", "stall", "drop", "cap")
KINDS = (*NODE_FAULTS, "superlink-kill")
# key -> (Fault field, how to read it)
_KEYS = {"node": "nodes", "nodes": "nodes", "for": "duration", "down": "duration",
         "ms": "value", "kbit": "value"}  # fmt: skip
_ITEM = re.compile(
    r"^(?P<kind>[a-z-]+)@(?P<round>\d+)(?:\+(?P<after>[\d.]+|task))?(?::(?P<kv>.*))?$"
)
AT_TASK = "task"  # `+task`: once every named node runs a task (a ClientApp) in the round
_DEFAULT_DURATION = {"kill": 5.0, "superlink-kill": 0.0}


class FaultSpecError(ValueError):
    """A fault schedule that cannot be played (the message names the item and key)."""


@dataclass(frozen=True)
class Fault:
    """One fault: what, when (round and seconds into it), on which nodes, how long.

    ``duration`` is how long the fault lasts (a kill: the seconds before the
    restart); ``value`` is the delay's milliseconds or the cap's kbit/s. With
    ``at_task`` (``+task``) it fires once every named node runs a task in the round,
    instead of ``after`` seconds into it: a node killed then has taken its message
    and not answered it, whatever the machine's speed.
    """

    kind: str
    round: int
    nodes: tuple[int, ...] = ()
    after: float = 0.0
    duration: float = 0.0
    value: float | None = None
    at_task: bool = False

    def __post_init__(self) -> None:
        where = f"fault {self.text()!r}"
        if self.at_task and (self.kind not in NODE_FAULTS or self.after):
            raise FaultSpecError(f"{where}: '+task' is for node faults, without seconds")
        if self.kind not in KINDS:
            raise FaultSpecError(f"{where}: unknown kind; allowed: {', '.join(KINDS)}")
        if self.round < 1:
            raise FaultSpecError(f"{where}: the round must be ≥ 1")
        if self.after < 0 or self.duration < 0:
            raise FaultSpecError(f"{where}: 'after' and 'for' must be ≥ 0 seconds")
        if self.kind in NODE_FAULTS and not self.nodes:
            raise FaultSpecError(f"{where}: key 'node' (or 'nodes=a/b/c') is required")
        if self.kind == "superlink-kill" and self.nodes:
            raise FaultSpecError(f"{where}: a SuperLink kill names no node")
        if self.kind in ("freeze", "partition", "delay", "stall", "drop", "cap") and (
            self.duration <= 0
        ):
            raise FaultSpecError(f"{where}: key 'for' (seconds > 0) is required")
        needs = {"delay": "ms", "cap": "kbit"}.get(self.kind)
        if needs and (self.value is None or self.value <= 0):
            raise FaultSpecError(f"{where}: key {needs!r} (> 0) is required")
        if len(set(self.nodes)) != len(self.nodes) or any(n < 0 for n in self.nodes):
            raise FaultSpecError(f"{where}: key 'nodes' must name distinct indices ≥ 0")

    def text(self) -> str:
        """The schedule syntax for this fault."""
        keys = []
        if self.nodes:
            keys.append("nodes=" + "/".join(map(str, self.nodes)))
        if self.duration:
            keys.append(f"{'down' if self.kind == 'kill' else 'for'}={self.duration:g}")
        if self.value is not None:
            keys.append(f"{'ms' if self.kind == 'delay' else 'kbit'}={self.value:g}")
        after = f"+{AT_TASK}" if self.at_task else f"+{self.after:g}" if self.after else ""
        return f"{self.kind}@{self.round}{after}" + (":" + ",".join(keys) if keys else "")


def parse_fault(item: str) -> Fault:
    """One ``KIND@ROUND[+AFTER|+task][:key=value,...]`` item."""
    match = _ITEM.match(item.strip())
    if not match:
        raise FaultSpecError(
            f"fault {item!r}: expected KIND@ROUND[+AFTER|+task][:key=value,...]"
        )
    fields: dict[str, object] = {
        "kind": match["kind"],
        "round": int(match["round"]),
        "after": 0.0 if match["after"] == AT_TASK else float(match["after"] or 0),
        "at_task": match["after"] == AT_TASK,
        "duration": _DEFAULT_DURATION.get(match["kind"], 0.0),
    }
    for pair in filter(None, (match["kv"] or "").split(",")):
        key, _, value = pair.partition("=")
        if key not in _KEYS or not value:
            raise FaultSpecError(
                f"fault {item!r}: unknown key {key!r} or no value; allowed: "
                f"{', '.join(sorted(_KEYS))}"
            )
        try:
            if _KEYS[key] == "nodes":
                fields["nodes"] = tuple(int(n) for n in value.split("/"))
            else:
                fields[_KEYS[key]] = float(value)
        except ValueError:
            raise FaultSpecError(f"fault {item!r}: key {key!r}: not a number") from None
    return Fault(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FaultSchedule:
    """The faults of one soak, checked against its node and round counts."""

    faults: tuple[Fault, ...]
    nodes: int
    rounds: int

    def __post_init__(self) -> None:
        for fault in self.faults:
            if any(n >= self.nodes for n in fault.nodes):
                raise FaultSpecError(
                    f"fault {fault.text()!r}: key 'nodes': only nodes 0..{self.nodes - 1}"
                )
            if fault.round > self.rounds:
                raise FaultSpecError(
                    f"fault {fault.text()!r}: round {fault.round} > --rounds {self.rounds}"
                )
        if sum(f.kind == "superlink-kill" for f in self.faults) > 1:
            raise FaultSpecError("faults: at most one 'superlink-kill' per soak")

    @classmethod
    def parse(cls, text: str, nodes: int, rounds: int) -> FaultSchedule:
        """Items separated by spaces or ';'."""
        items = [i for i in re.split(r"[;\s]+", text) if i]
        return cls(tuple(parse_fault(i) for i in items), nodes, rounds)

    def text(self) -> str:
        """The whole schedule in its own syntax (printed and written to the verdict)."""
        return " ".join(f.text() for f in self.faults)

    @property
    def superlink_kill(self) -> Fault | None:
        """The SuperLink kill, if the schedule has one."""
        return next((f for f in self.faults if f.kind == "superlink-kill"), None)


@dataclass(frozen=True)
class RandomFaults:
    """How many faults of each kind :func:`random_schedule` draws, and how long."""

    kills: int = 0
    freezes: int = 0
    freeze_s: float = 30.0
    partitions: int = 0
    partition_s: float = 60.0
    partition_fraction: float = 0.25
    kill_down_s: float = 5.0
    max_after_s: float = 5.0

    def __post_init__(self) -> None:
        if min(self.kills, self.freezes, self.partitions) < 0:
            raise FaultSpecError("random faults: counts must be ≥ 0")
        if not 0 < self.partition_fraction <= 1:
            raise FaultSpecError(
                "random faults: key 'partition_fraction' must be in (0, 1]"
            )


def random_schedule(
    spec: RandomFaults, nodes: int, rounds: int, seed: int
) -> FaultSchedule:
    """Draw the faults from ``seed``: each in a round from 2 to ``rounds - 1`` (round
    1 starts after the start-up, and the last round stays clean so the run can end;
    fewer rounds than 3 allow round 1), on nodes not already faulted in that round."""
    rng = random.Random(seed)
    first, last = (2, rounds - 1) if rounds >= 3 else (1, 1)
    busy: dict[int, set[int]] = {}
    faults: list[Fault] = []

    def pick(count: int, round_: int) -> tuple[int, ...]:
        free = [n for n in range(nodes) if n not in busy.setdefault(round_, set())]
        if len(free) < count:
            raise FaultSpecError(f"random faults: too few free nodes in round {round_}")
        chosen = tuple(sorted(rng.sample(free, count)))
        busy[round_].update(chosen)
        return chosen

    def after() -> float:
        return round(rng.uniform(0, spec.max_after_s), 1)

    for _ in range(spec.partitions):
        r = rng.randint(first, last)
        size = max(1, round(nodes * spec.partition_fraction))
        faults.append(Fault("partition", r, pick(size, r), after(), spec.partition_s))
    for _ in range(spec.kills):
        r = rng.randint(first, last)
        faults.append(Fault("kill", r, pick(1, r), after(), spec.kill_down_s))
    for _ in range(spec.freezes):
        r = rng.randint(first, last)
        faults.append(Fault("freeze", r, pick(1, r), after(), spec.freeze_s))
    faults.sort(key=lambda f: (f.round, f.after))
    return FaultSchedule(tuple(faults), nodes, rounds)


def parse_random(text: str) -> RandomFaults:
    """``kills=3,freezes=2,freeze-s=30,partitions=1,partition-s=60,partition-fraction=0.25``."""
    names = {f.name: f.name.replace("_", "-") for f in fields(RandomFaults)}
    values: dict[str, float | int] = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        attr = next((a for a, n in names.items() if n == key.strip()), None)
        if attr is None:
            raise FaultSpecError(
                f"--random-faults: unknown key {key!r}; allowed: "
                + ", ".join(names.values())
            )
        try:
            counted = attr in ("kills", "freezes", "partitions")
            values[attr] = int(value) if counted else float(value)
        except ValueError:
            raise FaultSpecError(f"--random-faults: key {key!r}: not a number") from None
    return RandomFaults(**values)  # type: ignore[arg-type]
