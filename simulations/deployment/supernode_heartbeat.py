"""``flower-supernode`` with its own heartbeat interval, ClientApp patience or pull pace.

Flower 1.42's SuperNode always declares 30 s, and the SuperLink keeps a node online
until 2 x the declared interval has passed without a heartbeat. A node that crashed
therefore holds up its in-flight message, and is refused re-admission, for up to 60 s.
The SuperLink accepts any interval in [10 s, 30 min] (``HEARTBEAT_MIN_INTERVAL`` ..
``HEARTBEAT_MAX_INTERVAL``); only the SuperNode has no option to declare another.
This starts the unchanged ``flower-supernode`` with its declared interval (and its
heartbeat pace, which follows it) set to ``--heartbeat-interval``:

    python -m simulations.deployment.supernode_heartbeat --heartbeat-interval 10 \
        <flower-supernode arguments>

A shorter interval means a crash is noticed sooner, and a node cut off for longer than
2 x the interval is taken offline: use it for nodes that may crash, not for ones that
must ride out a network partition.

``--task-patience S`` is the other fixed 30 s: a SuperNode starts a ``flwr-clientapp``
process per message with a task token that lapses 30 s after it is handed out (60 s
after each heartbeat), and the process sends its first heartbeat only once Python and
Flower are imported. A node short of CPU (20 nodes' ClientApps at once on 2 cores, a
slow edge device) loses the token, every later call of that process is refused
("Runtime task-token authentication failed") and its reply never leaves. With S the
token lasts S seconds (2 x S after each heartbeat); a ClientApp that died is then
given up after up to 2 x S instead of 60 s.

``--pull-interval S`` is Flower's fixed 3 s between a node's pulls when the SuperLink
had no message for it (``start_client_internal``: ``time.sleep(3)``). A node that has
just sent its reply asks for the next message at once; the server is still waiting
for the other nodes, so the node sleeps 3 s, and every stage of a round (secure
aggregation has four) waits up to that long after its message is ready. With S the
node asks again after S seconds, and waits for its ClientApp's reply in steps of at
most S (Flower's 0.5 s). Each pull is one small request to the SuperLink.

``--wake-superexec`` starts the node's SuperExec so that it is woken when the node
stores a message, instead of asking every 0.1 s
(:mod:`simulations.launch.superexec_wakeup`).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

from simulations.launch.superexec_wakeup import wake_supernode_superexec

# What ``local.py`` starts instead of ``flower-supernode`` when given an interval.
MODULE = "simulations.deployment.supernode_heartbeat"
TASK_PATIENCE_MIN = 30.0  # Flower's own: a patience only ever lengthens it
FLOWER_PULL_S = 3.0  # Flower's idle sleep between pulls, which a pull interval replaces
PULL_INTERVAL_MIN = 0.1


def _seconds(text: str, low: float, high: float, what: str) -> float:
    value = float(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} from {low:g} to {high:g} s, got {text}")
    return value


def interval(text: str) -> float:
    """A heartbeat interval the SuperLink accepts, in seconds."""
    what = "the SuperLink accepts heartbeat intervals"
    return _seconds(text, HEARTBEAT_MIN_INTERVAL, HEARTBEAT_MAX_INTERVAL, what)


def patience(text: str) -> float:
    """A ClientApp task patience, in seconds: at least Flower's own 30 s."""
    what = "a task patience runs, Flower's own the shortest,"
    return _seconds(text, TASK_PATIENCE_MIN, HEARTBEAT_MAX_INTERVAL, what)


def pull_interval(text: str) -> float:
    """A pause between idle pulls, in seconds: shorter than Flower's own 3 s."""
    what = "a pull interval runs"
    return _seconds(text, PULL_INTERVAL_MIN, FLOWER_PULL_S, what)


class PacedTime:
    """Flower's SuperNode loop's ``time`` module, with its sleeps shortened.

    The loop sleeps 3 s after an empty pull and 0.5 s between looks for a reply;
    those become ``pull`` and ``min(0.5, pull)``. Everything else is ``time``'s.
    """

    def __init__(self, pull: float) -> None:
        self.pull = pull

    def sleep(self, seconds: float) -> None:
        """Sleep ``pull`` for Flower's idle pause, at most ``pull`` otherwise."""
        time.sleep(self.pull if seconds == FLOWER_PULL_S else min(seconds, self.pull))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def wrapper_args(
    heartbeat_interval: float | None,
    task_patience: float | None,
    pull: float | None = None,
    wake_superexec: bool = False,
) -> list[str]:
    """The command that starts a SuperNode with these settings instead of the stock
    ``flower-supernode`` (empty when all are Flower's own)."""
    if (heartbeat_interval, task_patience, pull) == (None,) * 3 and not wake_superexec:
        return []
    args = [sys.executable, "-m", MODULE]
    if heartbeat_interval is not None:
        args += ["--heartbeat-interval", str(heartbeat_interval)]
    if task_patience is not None:
        args += ["--task-patience", str(task_patience)]
    if pull is not None:
        args += ["--pull-interval", str(pull)]
    if wake_superexec:
        args.append("--wake-superexec")
    return args


def main(argv: list[str] | None = None) -> int | None:
    """Set the interval, patience and pull pace; run ``flower-supernode`` with the rest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat-interval", type=interval)
    parser.add_argument("--task-patience", type=patience)
    parser.add_argument("--pull-interval", type=pull_interval)
    parser.add_argument("--wake-superexec", action="store_true")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    settings = (args.heartbeat_interval, args.task_patience, args.pull_interval)
    if settings == (None,) * 3 and not args.wake_superexec:
        parser.error(
            "give --heartbeat-interval, --task-patience, --pull-interval or "
            "--wake-superexec"
        )

    # Each module copied Flower's constant at import and uses it for one thing: the
    # interval the node declares (activation, heartbeats), the sender's pace, and the
    # lifetime of its ClientApps' task tokens.
    import flwr.supercore.corestate.in_memory_corestate as tasks
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as node_loop
    from flwr.supernode.cli import flower_supernode

    if args.heartbeat_interval is not None:
        connection.HEARTBEAT_DEFAULT_INTERVAL = args.heartbeat_interval
        sender.HEARTBEAT_DEFAULT_INTERVAL = args.heartbeat_interval
    if args.task_patience is not None:
        tasks.HEARTBEAT_DEFAULT_INTERVAL = args.task_patience
    if args.pull_interval is not None:  # the loop calls time.sleep through this name
        node_loop.time = PacedTime(args.pull_interval)  # type: ignore[assignment]
    if args.wake_superexec:  # its SuperExec woken per stored message, not polling
        wake_supernode_superexec(node_loop)
    sys.argv = ["flower-supernode", *rest]
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
