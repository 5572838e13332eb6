"""What a node says about itself in ``node_config``: its data and its state folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NodeConfigError(ValueError):
    """The node's ``node_config`` lacks what this client needs, or is contradictory."""


@dataclass(frozen=True)
class NodeSettings:
    """A simulated partition (``partition-id``/``num-partitions``) or local ``data-path``.

    ``state-dir`` is where the privacy ledger and the device's privacy policy live
    on a real node; a node with its own ``data-path`` must have one, since its
    budget spans every run on that data. A node without one is a simulated
    partition, whose privacy policy is the run config.
    """

    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    state_dir: str | None = None
    # A simulated partition's ledger folder in the run's results (see ledger_dir).
    simulated_ledger_dir: str | None = None

    def __post_init__(self) -> None:
        has_partition = self.partition_id is not None or self.num_partitions is not None
        if has_partition and self.data_path is not None:
            raise NodeConfigError(
                "node config: give either 'data-path' or 'partition-id' and "
                "'num-partitions', not both"
            )
        if self.data_path is not None and self.state_dir is None:
            raise NodeConfigError(
                "node config: a node with its own 'data-path' needs 'state-dir' (its "
                "privacy ledger and privacy-policy.toml live there)"
            )
        if self.data_path is None:
            if self.partition_id is None or self.num_partitions is None:
                raise NodeConfigError(
                    "node config lacks 'partition-id' and 'num-partitions' (simulated "
                    "shard) or 'data-path' (a node's own .npz, .csv or IDX directory)"
                )
            if not 0 <= self.partition_id < self.num_partitions:
                raise NodeConfigError(
                    "node config: need 0 <= partition-id < num-partitions, got "
                    f"{self.partition_id}, {self.num_partitions}"
                )

    @property
    def ledger_dir(self) -> str | None:
        """Where the privacy ledger is a file: the node's ``state-dir``, or a simulated
        partition's folder in the results; ``None``: only in ``context.state``."""
        return self.state_dir or self.simulated_ledger_dir

    def in_results(self, results_dir: str) -> NodeSettings:
        """A simulated partition keeps its ledger in ``<results-dir>/nodes/partition-<id>``
        so that it outlives the simulation (a resume continues it); a node with its own
        ``state-dir`` or data keeps its own, and without a results folder nothing changes.
        """
        if self.state_dir or self.data_path or not results_dir:
            return self
        folder = Path(results_dir).expanduser() / "nodes" / f"partition-{self.label}"
        return dataclasses.replace(self, simulated_ledger_dir=str(folder))

    @property
    def label(self) -> int:
        """The partition id reported to the server (-1 for a node's own data)."""
        return self.partition_id if self.partition_id is not None else -1

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        """Parse and type-check a Flower ``node_config``."""
        allowed = {"partition-id", "num-partitions", "data-path", "state-dir"}
        unknown = sorted(set(node_config) - allowed)
        if unknown:
            raise NodeConfigError(
                f"unknown node config key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        for key in ("partition-id", "num-partitions"):
            value = node_config.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise NodeConfigError(f"node config key '{key}': must be an integer")
        for key in ("data-path", "state-dir"):
            value = node_config.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise NodeConfigError(
                    f"node config key '{key}': must be a non-empty string"
                )
        return cls(
            partition_id=node_config.get("partition-id"),
            num_partitions=node_config.get("num-partitions"),
            data_path=node_config.get("data-path"),
            state_dir=node_config.get("state-dir"),
        )
