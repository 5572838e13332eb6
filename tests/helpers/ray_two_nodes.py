"""A two-node Ray cluster on 127.0.0.1, held until SIGTERM (for the multi-node test).

Both nodes bind only 127.0.0.1. ``ray start`` cannot build such a cluster on one
Linux host: a worker node refuses to join while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
is 0, and without it Ray replaces 127.0.0.1 with the host's network address and
binds every interface for any other node address. Ray's own test utility
(``ray.cluster_utils.Cluster``) starts the second raylet without that check; each
node has 1 CPU, so a federation with 1 CPU per ClientApp runs on both.

    python -m tests.helpers.ray_two_nodes PORT TEMP_DIR   # prints {"address": ..., ...}
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from ray.cluster_utils import Cluster

OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB


def main(argv: list[str]) -> int:
    """Start the cluster, print its address and node IDs, wait for SIGTERM."""
    port, temp_dir = int(argv[0]), argv[1]
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise SystemExit("set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only)")
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"), exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cluster = Cluster(initialize_head=False, shutdown_at_exit=True)
    try:
        common = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
        head = cluster.add_node(
            **common,
            node_ip_address="127.0.0.1",
            gcs_server_port=port,
            temp_dir=temp_dir,
            include_dashboard=False,
        )
        worker = cluster.add_node(**common, node_ip_address="127.0.0.1", temp_dir=temp_dir)
        print(
            json.dumps(
                {"address": cluster.address, "nodes": [head.node_id, worker.node_id]}
            ),
            flush=True,
        )
        stop.wait()
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
