"""``flower-supernode`` declaring a heartbeat interval of its own.

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
"""

from __future__ import annotations

import argparse
import sys

from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

# What ``local.py`` starts instead of ``flower-supernode`` when given an interval.
MODULE = "simulations.deployment.supernode_heartbeat"


def interval(text: str) -> float:
    """A heartbeat interval the SuperLink accepts, in seconds."""
    value = float(text)
    if not HEARTBEAT_MIN_INTERVAL <= value <= HEARTBEAT_MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"the SuperLink accepts heartbeat intervals from {HEARTBEAT_MIN_INTERVAL} "
            f"to {HEARTBEAT_MAX_INTERVAL} s, got {text}"
        )
    return value


def main(argv: list[str] | None = None) -> int | None:
    """Set the interval, then run ``flower-supernode`` with the remaining arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat-interval", type=interval, required=True)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    # Both modules copied Flower's constant at import; each uses it for one thing: the
    # interval the node declares (activation, heartbeats) and the sender's pace.
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection
    from flwr.supernode.cli import flower_supernode

    connection.HEARTBEAT_DEFAULT_INTERVAL = args.heartbeat_interval
    sender.HEARTBEAT_DEFAULT_INTERVAL = args.heartbeat_interval
    sys.argv = ["flower-supernode", *rest]
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
