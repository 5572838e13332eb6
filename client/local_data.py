"""This client's shard of the training data, loaded once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from common.config import RunConfig
from common.datasets import load_dataset
from common.partitioning import PartitionSpec, partition_indices, split_local


class NodeConfigError(ValueError):
    """The node's ``node_config`` lacks what this client needs."""


@dataclass(frozen=True)
class ClientShard:
    """Local train and local test tensors of one client."""

    partition_id: int
    num_partitions: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def partition_of(node_config: dict[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from a simulation node config."""
    try:
        pid = node_config["partition-id"]
        count = node_config["num-partitions"]
    except KeyError as exc:
        raise NodeConfigError(
            f"node config lacks {exc.args[0]!r}; a simulated node needs "
            "'partition-id' and 'num-partitions'"
        ) from None
    if not (isinstance(pid, int) and isinstance(count, int) and 0 <= pid < count):
        raise NodeConfigError(
            f"node config: need 0 <= partition-id < num-partitions, got {pid!r}, {count!r}"
        )
    return pid, count


@lru_cache(maxsize=4)
def _load_shard(
    dataset: str,
    data_dir: str,
    seed: int,
    spec: PartitionSpec,
    local_test_fraction: float,
    partition_id: int,
) -> ClientShard:
    data = load_dataset(dataset, data_dir, seed)
    shards = partition_indices(data.y_train, spec, data.num_classes)
    train_idx, test_idx = split_local(
        shards[partition_id], local_test_fraction, seed, partition_id
    )
    return ClientShard(
        partition_id=partition_id,
        num_partitions=spec.num_partitions,
        x_train=torch.from_numpy(data.x_train[train_idx]),
        y_train=torch.from_numpy(data.y_train[train_idx]),
        x_test=torch.from_numpy(data.x_train[test_idx]),
        y_test=torch.from_numpy(data.y_train[test_idx]),
        num_classes=data.num_classes,
    )


def load_client_shard(cfg: RunConfig, node_config: dict[str, Any]) -> ClientShard:
    """The shard of the node's partition under ``cfg``'s partitioning."""
    partition_id, num_partitions = partition_of(node_config)
    spec = PartitionSpec(
        partitioner=cfg.partitioner,
        num_partitions=num_partitions,
        seed=cfg.seed,
        dirichlet_alpha=cfg.dirichlet_alpha,
        classes_per_client=cfg.classes_per_client,
    )
    return _load_shard(
        cfg.dataset, cfg.data_dir, cfg.seed, spec, cfg.local_test_fraction, partition_id
    )
