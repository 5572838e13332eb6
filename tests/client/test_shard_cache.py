"""A node's shard cache: built once, reused, invalidated by data or settings, repaired."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import client.data.local_data as local_data
from client.data.local_data import ShardRecipe, build_arrays, load_client_shard
from client.data.shard_cache import CACHE_DIR, MANIFEST
from client.node_settings import NodeSettings
from common.config import RunConfig
from common.data.checks import DatasetError
from common.data.datasets import load_dataset
from common.data.partitioning import PartitionSpec, partition_indices, split_local


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[ShardRecipe]:
    """Every shard actually built (not read from the cache); a fresh process each call."""
    built: list[ShardRecipe] = []

    def counting(recipe: ShardRecipe) -> dict[str, np.ndarray]:
        built.append(recipe)
        return build_arrays(recipe)

    monkeypatch.setattr(local_data, "build_arrays", counting)
    monkeypatch.setattr(local_data, "CHEAP_SHARD_S", 0.0)  # every shard is cached
    monkeypatch.setattr(local_data, "_CHEAP", set())  # no family known cheap yet
    local_data._shard.cache_clear()
    return built


def _fresh(cfg: RunConfig, node: NodeSettings) -> local_data.ClientShard:
    """The shard as a new ClientApp process gets it (nothing held in memory)."""
    local_data._shard.cache_clear()
    return load_client_shard(cfg, node)


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / CACHE_DIR).iterdir() if not p.name.startswith("."))


def _stamps(entry: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in entry.iterdir()}


def _own_data(path: Path, n: int = 60, seed: int = 0) -> Path:
    """An .npz of raw 28x28 images (0..255) and labels, as a device holds it."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    np.savez(path, x=x, y=rng.integers(0, 10, size=n))
    return path


def _device(tmp_path: Path) -> NodeSettings:
    data = _own_data(tmp_path / "local.npz")
    return NodeSettings(data_path=str(data), state_dir=str(tmp_path / "state"))


def _same(a: local_data.ClientShard, b: local_data.ClientShard) -> bool:
    return all(
        torch.equal(getattr(a, k), getattr(b, k))
        for k in ("x_train", "y_train", "x_test", "y_test")
    )


def test_first_message_builds_the_second_reuses(
    tmp_path: Path, builds: list[ShardRecipe]
) -> None:
    """One build, then the entry's files are read as they are (same inode, mtime)."""
    cfg = RunConfig(task="fashion-mnist", local_test_fraction=0.2)
    node = _device(tmp_path)
    first = _fresh(cfg, node)
    (entry,) = _entries(tmp_path / "state")
    stamps = _stamps(entry)
    second = _fresh(cfg, node)
    assert len(builds) == 1
    assert _stamps(entry) == stamps
    assert _same(first, second)
    assert len(second.x_train) == 48 and len(second.x_test) == 12
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["key"] == entry.name == builds[0].cache_key()
    assert {p.stat().st_mode & 0o777 for p in entry.iterdir()} == {0o600}


def test_a_simulated_partition_caches_in_its_results_folder(
    tmp_path: Path, builds: list[ShardRecipe]
) -> None:
    """``<results-dir>/nodes/partition-<id>``; the shard equals one built the old way
    (full dataset normalised, then indexed) bit for bit."""
    cfg = RunConfig(results_dir=str(tmp_path), local_test_fraction=0.25)
    node = NodeSettings(partition_id=2, num_partitions=5).in_results(cfg.results_dir)
    shard = _fresh(cfg, node)
    again = _fresh(cfg, node)
    assert len(builds) == 1 and _same(shard, again)
    assert len(_entries(tmp_path / "nodes" / "partition-2")) == 1
    data = load_dataset("digits", "", cfg.seed)
    rows = partition_indices(data.y_train, PartitionSpec.for_run(cfg, 5))[2]
    train, test = split_local(rows, 0.25, cfg.seed, 2)
    assert torch.equal(again.x_train, torch.from_numpy(data.x_train[train]))
    assert torch.equal(again.y_train, torch.from_numpy(data.y_train[train]))
    assert torch.equal(again.x_test, torch.from_numpy(data.x_train[test]))


def test_changing_the_data_file_invalidates(
    tmp_path: Path, builds: list[ShardRecipe]
) -> None:
    """A rewritten data file names a new entry; the old one is dropped."""
    cfg = RunConfig(task="fashion-mnist")
    node = _device(tmp_path)
    before = _fresh(cfg, node)
    (old,) = _entries(tmp_path / "state")
    _own_data(Path(node.data_path), seed=1)  # same size, other pixels
    after = _fresh(cfg, node)
    (new,) = _entries(tmp_path / "state")
    assert len(builds) == 2 and new.name != old.name
    assert not _same(before, after)
    direct = build_arrays(ShardRecipe.for_node(cfg, node))  # the new file, uncached
    assert np.array_equal(after.x_train.numpy(), direct["x_train"])


@pytest.mark.parametrize(
    "change",
    [{"features": "scattering"}, {"local_test_fraction": 0.5}, {"seed": 7}],
    ids=lambda c: next(iter(c)),
)
def test_changing_a_setting_invalidates(
    tmp_path: Path, builds: list[ShardRecipe], change: dict
) -> None:
    """The feature map, the local split or the seed: another entry, rebuilt."""
    base = RunConfig(task="fashion-mnist")
    node = _device(tmp_path)
    before = _fresh(base, node)
    (old,) = _entries(tmp_path / "state")
    changed = RunConfig(task="fashion-mnist", **change)
    after = _fresh(changed, node)
    (new,) = _entries(tmp_path / "state")
    assert len(builds) == 2 and new.name != old.name
    if "features" in change:
        assert before.x_train.shape[1:] == (1, 28, 28)
        assert after.x_train.shape[1:] == (81, 7, 7)
    _fresh(changed, node)
    assert len(builds) == 2  # and the new entry is reused


def test_a_partition_setting_invalidates(tmp_path: Path, builds: list[ShardRecipe]) -> None:
    """Another partitioner (or node count) is another shard."""
    node = NodeSettings(partition_id=1, num_partitions=4, state_dir=str(tmp_path))
    _fresh(RunConfig(), node)
    _fresh(RunConfig(partitioner="dirichlet"), node)
    _fresh(RunConfig(partitioner="dirichlet"), node)
    assert [r.partition.partitioner for r in builds] == ["iid", "dirichlet"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: _flip_byte(e / "x_train.npy"),
        lambda e: (e / "y_train.npy").write_bytes((e / "y_train.npy").read_bytes()[:-8]),
        lambda e: (e / "x_test.npy").unlink(),
        lambda e: (e / MANIFEST).write_text("{not json"),
        lambda e: (e / MANIFEST).unlink(),
        lambda e: (e / "y_test.npy").write_bytes(b""),
    ],
    ids=["bit-flip", "truncated", "missing-array", "bad-manifest", "no-manifest", "empty"],
)
def test_a_damaged_entry_is_rebuilt(
    tmp_path: Path, builds: list[ShardRecipe], damage, caplog: pytest.LogCaptureFixture
) -> None:
    """Never used as it is: detected, logged, rebuilt to the same shard, and stored
    again whole."""
    cfg = RunConfig(task="fashion-mnist", local_test_fraction=0.2)
    node = _device(tmp_path)
    good = _fresh(cfg, node)
    (entry,) = _entries(tmp_path / "state")
    damage(entry)
    with caplog.at_level("WARNING", logger="privfed.client"):
        rebuilt = _fresh(cfg, node)
    assert "damaged" in caplog.text
    assert len(builds) == 2 and _same(good, rebuilt)
    (again,) = _entries(tmp_path / "state")
    assert again.name == entry.name
    _fresh(cfg, node)
    assert len(builds) == 2  # the rewritten entry verifies


def test_data_that_fails_its_checks_is_never_cached(
    tmp_path: Path, builds: list[ShardRecipe]
) -> None:
    """A file replaced by a bad one fails the checks (no shard from the old entry),
    and nothing is stored for it."""
    cfg = RunConfig(task="fashion-mnist")
    node = _device(tmp_path)
    _fresh(cfg, node)
    x = np.full((60, 28, 28), 300.0)  # outside 0..255
    np.savez(node.data_path, x=x, y=np.zeros(60, dtype=np.int64))
    for _ in range(2):
        with pytest.raises(DatasetError, match="outside 0..255"):
            _fresh(cfg, node)
    assert len(_entries(tmp_path / "state")) == 1  # only the good file's entry
    assert len(builds) == 3


def test_code_or_library_changes_change_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The key covers the shard code and the libraries, not only the recipe."""
    recipe = ShardRecipe.for_node(RunConfig(task="fashion-mnist"), _device(tmp_path))
    key = recipe.cache_key()
    monkeypatch.setattr(local_data, "_library_versions", lambda: {"numpy": "0"})
    assert recipe.cache_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(local_data, "_code_fingerprint", lambda task_code: "other code")
    assert recipe.cache_key() != key


def test_a_group_message_reads_each_shard_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a group message (batched training, then each client's handler) a shard
    is read from the node's cache once, however large the group; after it, again."""
    from client.data.local_data import shards_kept_for_group

    reads: list[str] = []
    real = local_data._cached_arrays

    def counting(recipe: ShardRecipe, folder: str) -> dict[str, np.ndarray]:
        reads.append(folder)
        return real(recipe, folder)

    monkeypatch.setattr(local_data, "_cached_arrays", counting)
    cfg = RunConfig(results_dir=str(tmp_path))
    nodes = [
        NodeSettings(partition_id=p, num_partitions=200).in_results(cfg.results_dir)
        for p in range(0, 200, 1)
    ]
    local_data._shard.cache_clear()
    with shards_kept_for_group():
        first = [load_client_shard(cfg, n) for n in nodes]  # more than _shard's memo
        second = [load_client_shard(cfg, n) for n in nodes]
    assert len(reads) == 200 and all(a is b for a, b in zip(first, second, strict=True))
    load_client_shard(cfg, nodes[0])  # the group is over: its shards are gone
    assert len(reads) == 201


def test_a_cheap_simulated_partition_is_rebuilt_not_written(
    tmp_path: Path, builds: list[ShardRecipe], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition built faster than CHEAP_SHARD_S is built at every message and never
    written (the same shard each time); a node's own data is cached however fast."""
    monkeypatch.setattr(local_data, "CHEAP_SHARD_S", 3600.0)  # every build is cheap
    looked: list[str] = []
    read_entry = local_data.shard_cache.read_entry
    monkeypatch.setattr(
        local_data.shard_cache, "read_entry",
        lambda root, key, names: (looked.append(key), read_entry(root, key, names))[1],
    )  # fmt: skip
    cfg = RunConfig(results_dir=str(tmp_path), local_test_fraction=0.25)
    node = NodeSettings(partition_id=2, num_partitions=5).in_results(cfg.results_dir)
    first, again = _fresh(cfg, node), _fresh(cfg, node)
    assert len(builds) == 2 and _same(first, again)
    # Known cheap after the first build: the cache is not even looked in again,
    # for this partition or another of the same run's dataset.
    other = NodeSettings(partition_id=3, num_partitions=5).in_results(cfg.results_dir)
    _fresh(cfg, other)
    assert len(looked) == 1 and len(builds) == 3
    builds.pop()
    cache = tmp_path / "nodes" / "partition-2" / CACHE_DIR
    assert not cache.exists() or not any(cache.iterdir())
    device = _device(tmp_path)
    _fresh(RunConfig(task="fashion-mnist"), device)
    _fresh(RunConfig(task="fashion-mnist"), device)
    assert len(builds) == 3 and len(_entries(tmp_path / "state")) == 1
