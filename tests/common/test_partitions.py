"""Partitions: deterministic per seed, disjoint, complete, per partitioner."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.datasets import load_arrays
from common.data.partitioning import (
    PartitionError,
    PartitionSpec,
    partition_indices,
    split_local,
)

LABELS = load_arrays("digits", "", 0).y_train
SPECS = [
    PartitionSpec("iid", 10, seed=1),
    PartitionSpec("dirichlet", 10, seed=1, dirichlet_alpha=0.5),
    PartitionSpec("dirichlet", 5, seed=1, dirichlet_alpha=100.0),
    PartitionSpec("pathological", 10, seed=1, classes_per_client=2),
    PartitionSpec("pathological", 4, seed=1, classes_per_client=7),
    PartitionSpec("inner-dirichlet", 40, seed=1, dirichlet_alpha=0.5),
]


def _library_rows(spec: PartitionSpec) -> list[np.ndarray]:
    """Each partition's rows as flwr-datasets' own ``load_partition`` gives them."""
    import datasets as hf_datasets

    from common.data.partitioning import _make_partitioner

    order = np.random.default_rng(spec.seed).permutation(len(LABELS))
    table = hf_datasets.Dataset.from_dict({"index": order, "label": LABELS[order]})
    partitioner = _make_partitioner(spec, 10, len(LABELS))
    partitioner.dataset = table
    return [
        np.sort(np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64))
        for pid in range(spec.num_partitions)
    ]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.partitioner}-{s.num_partitions}")
def test_the_fast_path_gives_the_library_partitions(spec: PartitionSpec) -> None:
    """Partitions read at once (and inner-dirichlet's linear-time draw) equal what the
    pinned flwr-datasets gives partition by partition."""
    ours = partition_indices(LABELS, spec)
    for pid, theirs in enumerate(_library_rows(spec)):
        assert np.array_equal(ours[pid], theirs), pid


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.partitioner}-{s.num_partitions}")
def test_disjoint_and_complete(spec: PartitionSpec) -> None:
    """Every training index lands in exactly one partition."""
    shards = partition_indices(LABELS, spec)
    assert len(shards) == spec.num_partitions
    joined = np.concatenate(shards)
    assert len(joined) == len(LABELS)  # no duplicates across or within shards
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    assert all(len(s) > 0 for s in shards)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.partitioner}-{s.num_partitions}")
def test_deterministic_per_seed(spec: PartitionSpec) -> None:
    """The same seed gives the same partitions, also from a fresh copy of the labels."""
    first = partition_indices(LABELS, spec)
    again = partition_indices(LABELS.copy(), spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_other_seed_other_partitions(partitioner: str) -> None:
    """A different seed shuffles differently."""
    a = partition_indices(LABELS, PartitionSpec(partitioner, 10, seed=1))
    b = partition_indices(LABELS, PartitionSpec(partitioner, 10, seed=2))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_shards_are_balanced_and_mixed() -> None:
    """IID shards differ in size by at most one and each holds most classes."""
    shards = partition_indices(LABELS, PartitionSpec("iid", 10, seed=3))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(LABELS[s])) >= 8 for s in shards)


def test_dirichlet_is_skewed_at_small_alpha() -> None:
    """α = 0.1 concentrates classes far more than α = 100."""

    def skew(alpha: float) -> float:
        shards = partition_indices(LABELS, PartitionSpec("dirichlet", 10, 4, alpha))
        return float(
            np.mean([np.bincount(LABELS[s], minlength=10).max() / len(s) for s in shards])
        )

    assert skew(0.1) > skew(100.0) + 0.2


def test_pathological_classes_per_client() -> None:
    """Each pathological client holds exactly k classes."""
    shards = partition_indices(
        LABELS, PartitionSpec("pathological", 10, 0, classes_per_client=3)
    )
    assert all(len(np.unique(LABELS[s])) == 3 for s in shards)


def test_impossible_pathological_setting_is_refused() -> None:
    """3 clients x 2 classes cannot cover 10 classes: refuse rather than drop data."""
    spec = PartitionSpec("pathological", 3, seed=0, classes_per_client=2)
    with pytest.raises(PartitionError, match="'classes-per-client'"):
        partition_indices(LABELS, spec)


def test_cached_shards_are_read_only() -> None:
    """The cached partitions cannot be edited in place by a caller."""
    shard = partition_indices(LABELS, PartitionSpec("iid", 10, seed=9))[0]
    with pytest.raises(ValueError):
        shard[0] = -1


def test_bad_partitioner_is_named() -> None:
    """An unknown partitioner fails naming the key."""
    with pytest.raises(PartitionError, match="'partitioner'"):
        PartitionSpec("shards", 3, seed=0)


def test_local_split_is_deterministic_disjoint_and_complete() -> None:
    """A client's train/test split covers its shard, without overlap, per seed."""
    shard = partition_indices(LABELS, PartitionSpec("iid", 10, seed=0))[4]
    train, test = split_local(shard, 0.1, seed=0, partition_id=4)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.sort(shard))
    assert len(test) == round(0.1 * len(shard))
    again = split_local(shard, 0.1, seed=0, partition_id=4)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    with pytest.raises(PartitionError, match="too few"):
        split_local(shard[:0], 0.5, seed=0, partition_id=4)


def test_partitions_of_frozen_labels_reuse_their_bytes_and_mutable_ones_do_not() -> None:
    """The memo behind a node's 1,000 partition lookups a round: the same shards for
    the same frozen labels; labels that can still change are read afresh each time."""
    from common.data.partitioning import _labels_bytes

    frozen = np.arange(100, dtype=np.int64) % 3
    frozen.setflags(write=False)
    spec = PartitionSpec("iid", 7, seed=3)
    first = partition_indices(frozen, spec, 3)
    assert _labels_bytes(frozen) is _labels_bytes(frozen)
    again = partition_indices(frozen, spec, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))

    mutable = np.zeros(100, dtype=np.int64)
    view = mutable[:]
    view.setflags(write=False)  # read-only view of memory that can still change
    assert _labels_bytes(view) is not _labels_bytes(view)
    mutable[:50] = 1
    assert _labels_bytes(view) == mutable.tobytes()  # read afresh, never a stale copy
