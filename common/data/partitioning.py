"""Split a training set across clients with flwr-datasets partitioners.

Partitions are deterministic per seed, disjoint, and together cover the whole
training set; a setting that would drop samples is refused instead. ``sites``
is the natural split of a task whose records carry a site (a hospital, a bank):
one client per site, in sorted site order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from common.run_keys import PARTITIONERS

if TYPE_CHECKING:  # imported lazily: a node with its own data never needs them
    from flwr_datasets.partitioner.partitioner import Partitioner

    from common.config import RunConfig


class PartitionError(ValueError):
    """The requested partitioning is impossible for this federation."""


@dataclass(frozen=True)
class PartitionSpec:
    """How to partition: which partitioner and its parameters."""

    partitioner: str
    num_partitions: int
    seed: int
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise PartitionError(f"num-partitions must be >= 1, got {self.num_partitions}")
        if self.partitioner not in PARTITIONERS:
            raise PartitionError(
                f"run config key 'partitioner': unknown partitioner "
                f"{self.partitioner!r}; allowed: {', '.join(map(repr, PARTITIONERS))}"
            )

    @classmethod
    def for_run(cls, cfg: RunConfig, num_partitions: int) -> PartitionSpec:
        """The split a run config asks for, over ``num_partitions`` clients."""
        return cls(
            partitioner=cfg.partitioner,
            num_partitions=num_partitions,
            seed=cfg.seed,
            dirichlet_alpha=cfg.dirichlet_alpha,
            classes_per_client=cfg.classes_per_client,
        )


def _make_partitioner(
    spec: PartitionSpec, num_classes: int, num_records: int
) -> Partitioner:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        InnerDirichletPartitioner,
        PathologicalPartitioner,
    )

    if spec.partitioner == "iid":
        return IidPartitioner(num_partitions=spec.num_partitions)
    if spec.partitioner == "inner-dirichlet":
        # Hsu et al. 2019: equal shards, each with its own Dirichlet(α) class mix; it
        # keeps every client non-empty where the per-class split cannot (10,000
        # clients of 6 records).
        sizes = [
            len(part)
            for part in np.array_split(np.arange(num_records), spec.num_partitions)
        ]
        return InnerDirichletPartitioner(
            partition_sizes=sizes,
            partition_by="label",
            alpha=spec.dirichlet_alpha,
            seed=spec.seed,
        )
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="label",
            alpha=spec.dirichlet_alpha,
            min_partition_size=1,
            seed=spec.seed,
        )
    covered = min(num_classes, spec.num_partitions + spec.classes_per_client - 1)
    if covered < num_classes:
        raise PartitionError(
            f"run config key 'classes-per-client': pathological partitioning of "
            f"{num_classes} classes over {spec.num_partitions} clients with "
            f"{spec.classes_per_client} classes each would drop classes "
            f"{list(range(covered, num_classes))}; need clients + "
            f"classes-per-client - 1 >= {num_classes}"
        )
    return PathologicalPartitioner(
        num_partitions=spec.num_partitions,
        partition_by="label",
        num_classes_per_partition=spec.classes_per_client,
        class_assignment_mode="deterministic",
        seed=spec.seed,
    )


@lru_cache(maxsize=8)
def _partition_all(
    labels_bytes: bytes, spec: PartitionSpec, num_classes: int
) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    # Shuffle once by seed so that IID shards are not contiguous slices.
    order = np.random.default_rng(spec.seed).permutation(len(labels))
    if spec.partitioner == "iid":  # IidPartitioner's rows, without importing it
        rows = iid_rows(len(labels), spec.num_partitions)
    else:
        import datasets as hf_datasets

        table = hf_datasets.Dataset.from_dict(
            {"index": order.astype(np.int64), "label": labels[order]}
        )
        partitioner = _make_partitioner(spec, num_classes, len(labels))
        partitioner.dataset = table
        rows = _partition_rows(partitioner, spec, len(labels), num_classes)
    shards = tuple(np.sort(order[r].astype(np.int64)) for r in rows)
    for shard in shards:  # cached and shared: nobody may edit them in place
        shard.setflags(write=False)
    return shards


def inner_dirichlet_rows(
    labels: np.ndarray, sizes: list[int], alpha: float, seed: int, num_classes: int
) -> list[np.ndarray]:
    """flwr-datasets' ``InnerDirichletPartitioner`` assignment, in linear time.

    Written for a measured reason: the library re-sums every client's remaining
    count and searches its client list on each of the N draws, quadratic in the
    number of clients (10,000 clients of 6 Fashion-MNIST records: about 4 minutes
    per process). This makes the same generator calls in the same order (the
    Dirichlet class mixes, a client per draw, a class per draw, the final shuffles)
    and keeps the remaining total and the open clients incrementally, so it returns
    exactly the library's partitions (tests/common/test_partitions.py checks that).
    """
    rng = np.random.default_rng(seed=seed)
    priors = rng.dirichlet(alpha=np.full(num_classes, float(alpha)), size=len(sizes))
    by_class = [np.where(labels == k)[0] for k in range(num_classes)]
    left_in_class = [len(rows) for rows in by_class]
    shards = [np.zeros(size, dtype=np.int64) for size in sizes]
    left = list(sizes)
    remaining = sum(sizes)
    open_clients = list(range(len(sizes)))

    def class_cdfs(p: np.ndarray) -> np.ndarray:
        cdf = p.cumsum(axis=1)
        return cdf / cdf[:, -1:]  # Generator.choice(p=...) normalises the same way

    cdfs = class_cdfs(priors)
    while remaining:
        # Generator.choice(list) draws integers(0, n, dtype=int64); choice(p=...)
        # draws one random() and searches the normalised cumulative sum.
        client = open_clients[int(rng.integers(0, len(open_clients), dtype=np.int64))]
        if left[client] == 0:  # full: never drawn again
            open_clients.remove(client)
            continue
        left[client] -= 1
        remaining -= 1
        while True:
            k = int(np.searchsorted(cdfs[client], rng.random(), side="right"))
            if left_in_class[k] == 0:  # exhausted: no client draws it again
                priors[:, k] = 0
                priors = priors / priors.sum(axis=1, keepdims=True)
                cdfs = class_cdfs(priors)
                continue
            left_in_class[k] -= 1
            shards[client][left[client]] = by_class[k][left_in_class[k]]
            break
    out = [shard.tolist() for shard in shards]
    for rows in out:
        rng.shuffle(rows)
    return [np.asarray(rows, dtype=np.int64) for rows in out]


def iid_rows(num_records: int, num_partitions: int) -> list[np.ndarray]:
    """``IidPartitioner``'s rows: ``Dataset.shard(contiguous=True)`` is ``array_split``.

    IID partitioning needs neither flwr-datasets nor Hugging Face ``datasets``, whose
    imports (matplotlib, pandas, pyarrow) cost a client process seconds;
    tests/common/test_partitions.py checks these rows against ``load_partition``.
    """
    return np.array_split(np.arange(num_records), num_partitions)


def _partition_rows(
    partitioner: Partitioner, spec: PartitionSpec, num_records: int, num_classes: int
) -> list[np.ndarray]:
    """Each partition's row positions in the partitioner's table, all at once.

    ``load_partition`` builds a Hugging Face dataset per call: 10,000 calls take
    minutes, in every process that serves clients. The same rows come from the
    partitioner's own assignment (``_partition_id_to_indices``, filled by its first
    ``load_partition``) or, for IID, from ``Dataset.shard(contiguous=True)``'s
    arithmetic, which is ``np.array_split``. tests/common/test_partitions.py checks both
    against ``load_partition`` for the pinned flwr-datasets.
    """
    from flwr_datasets.partitioner import IidPartitioner, InnerDirichletPartitioner

    if isinstance(partitioner, IidPartitioner):
        return iid_rows(num_records, spec.num_partitions)
    if isinstance(partitioner, InnerDirichletPartitioner):
        labels = np.asarray(partitioner.dataset["label"], dtype=np.int64)
        shares = np.array_split(np.arange(num_records), spec.num_partitions)
        sizes = [len(share) for share in shares]
        return inner_dirichlet_rows(
            labels, sizes, spec.dirichlet_alpha, spec.seed, num_classes
        )
    partitioner.load_partition(0)  # the library determines every assignment here
    assignment = partitioner._partition_id_to_indices  # noqa: SLF001 (see above)
    return [
        np.asarray(assignment[pid], dtype=np.int64) for pid in range(spec.num_partitions)
    ]


def site_rows(sites: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """One partition per distinct site (sorted), each its records in file order."""
    names, codes = np.unique(np.asarray(sites), return_inverse=True)
    if len(names) != num_partitions:
        raise PartitionError(
            f"run config key 'partitioner': 'sites' gives one client per site and the "
            f"task's records come from {len(names)} sites; run {len(names)} clients, "
            f"got {num_partitions}"
        )
    rows = [np.flatnonzero(codes == k).astype(np.int64) for k in range(len(names))]
    for shard in rows:
        shard.setflags(write=False)
    return rows


def partition_indices(
    labels: np.ndarray,
    spec: PartitionSpec,
    num_classes: int = 10,
    sites: np.ndarray | None = None,
) -> Sequence[np.ndarray]:
    """Indices into ``labels`` for every partition, in partition-id order.

    ``sites`` (one per record) is what ``partitioner = "sites"`` splits by. The
    shards are read-only and shared: a simulated node looks up one per client, and
    copying 100,000 of them into a new list cost 0.4 ms a lookup.
    """
    if spec.partitioner == "sites":
        if sites is None or len(sites) != len(labels):
            raise PartitionError(
                "run config key 'partitioner': 'sites' needs a task whose training "
                "records carry a natural site (Task.natural_sites)"
            )
        return site_rows(sites, spec.num_partitions)
    return _partition_all(_labels_bytes(labels), spec, num_classes)


_LABEL_BYTES: dict[int, tuple[np.ndarray, bytes]] = {}


def _labels_bytes(labels: np.ndarray) -> bytes:
    """``labels`` as int64 bytes, the same ``bytes`` object for the same read-only array.

    A simulated node looks up a partition per client (1,000 a round), and copying and
    hashing 260,000 labels each time cost 1.2 ms; a bytes object keeps its hash, so
    the memo's key is then found at once. Only read-only arrays (the cached training
    labels) are remembered, and each with a reference, so its id stays its own.
    """
    frozen = _read_only(labels)
    if frozen and id(labels) in _LABEL_BYTES:
        kept, data = _LABEL_BYTES[id(labels)]
        if kept is labels:
            return data
    data = np.ascontiguousarray(labels, dtype=np.int64).tobytes()
    if frozen:
        if len(_LABEL_BYTES) >= 8:
            _LABEL_BYTES.pop(next(iter(_LABEL_BYTES)))
        _LABEL_BYTES[id(labels)] = (labels, data)
    return data


def _read_only(array: np.ndarray) -> bool:
    """Neither the array nor any memory it views can be written."""
    base: object = array
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    return base is None or isinstance(base, bytes)


def split_local(
    indices: np.ndarray, test_fraction: float, seed: int, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's shard into local train and local test indices."""
    rng = np.random.default_rng([seed, partition_id % 2**32])  # -1: a node's own data
    shuffled = rng.permutation(np.array(indices))  # a copy: cached shards are read-only
    n_test = int(round(len(shuffled) * test_fraction))
    if len(shuffled) - n_test < 1:
        raise PartitionError(
            f"partition {partition_id} has {len(indices)} examples, too few to "
            f"train after holding out local-test-fraction={test_fraction}"
        )
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])
