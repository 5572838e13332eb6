"""This client's data: a simulated partition or the node's own files, loaded once."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from client.node_settings import NodeSettings
from common.canaries import canary_plan, inserts_canary_records
from common.config import RunConfig
from common.datasets import load_dataset
from common.features import compute_features
from common.local_datasets import load_local_arrays
from common.partitioning import PartitionSpec, partition_indices, split_local


@dataclass(frozen=True)
class ClientShard:
    """Local train and local test tensors of one client."""

    partition_id: int  # -1 for a node's own data
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def _shard(
    x: np.ndarray,
    y: np.ndarray,
    indices: np.ndarray,
    cfg: RunConfig,
    pid: int,
    canaries: tuple[np.ndarray, np.ndarray] | None = None,  # (pool indices, labels)
) -> ClientShard:
    train_idx, test_idx = split_local(indices, cfg.local_test_fraction, cfg.seed, pid)
    y_train = y[train_idx]
    if canaries is not None:  # audit: included canaries train, with their wrong labels
        train_idx = np.concatenate([train_idx, canaries[0]])
        y_train = np.concatenate([y_train, canaries[1]])
    return ClientShard(
        partition_id=pid,
        x_train=compute_features(cfg.features, torch.from_numpy(x[train_idx])),
        y_train=torch.from_numpy(y_train),
        x_test=compute_features(cfg.features, torch.from_numpy(x[test_idx])),
        y_test=torch.from_numpy(y[test_idx]),
        num_classes=10,
    )


# One entry per partition this process serves: a Ray worker serves several nodes,
# and a shard (with its features) is built once, not once per round.
@lru_cache(maxsize=32)
def _partition_shard(cfg: RunConfig, spec: PartitionSpec, partition_id: int) -> ClientShard:
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed)
    shards = partition_indices(data.y_train, spec, data.num_classes)
    indices, canaries = shards[partition_id], None
    if inserts_canary_records(cfg):
        plan = canary_plan(cfg.seed, cfg.audit_canaries, data.y_train, data.num_classes)
        indices, inserted = plan.split_partition(indices)
        canaries = (inserted, plan.labels_of(inserted))
    return _shard(data.x_train, data.y_train, indices, cfg, partition_id, canaries)


@lru_cache(maxsize=4)
def _local_shard(cfg: RunConfig, data_path: str) -> ClientShard:
    x, y = load_local_arrays(data_path, cfg.dataset)
    return _shard(x, y, np.arange(len(y)), cfg, -1)


def load_client_shard(cfg: RunConfig, node: NodeSettings) -> ClientShard:
    """The node's shard: its own ``data-path``, or its partition of the run's dataset."""
    if node.data_path is not None:
        return _local_shard(cfg, node.data_path)
    assert node.partition_id is not None and node.num_partitions is not None
    spec = PartitionSpec.for_run(cfg, node.num_partitions)
    return _partition_shard(cfg, spec, node.partition_id)
