"""This client's data: a simulated partition or the node's own files, prepared once.

A shard is made from a :class:`ShardRecipe` alone: the files it reads (with their
SHA-256) and the settings that shape it. A node with a folder of its own (its
``state-dir``, or a simulated partition's folder in the results) caches the prepared
shard there (:mod:`client.data.shard_cache`), keyed by the recipe's hash together with
the code that builds and checks shards and the library versions, so only its first
message loads, checks, partitions and featurises; later messages memory-map it.
A simulated partition built in under :data:`CHEAP_SHARD_S` (its process already
held the dataset: a simulation worker serving many clients) is not written:
building it again costs less than writing and reading it back (flights' 2–3-record
shards: 0.08 ms to build, about 1 ms to write).

The cache never bypasses the data checks: an entry is written only after its
sources passed :mod:`common.data.checks` in the code the key names, and it is
found only under a key naming those very file contents. A changed file or setting
gives another key (the old entry is dropped); a damaged entry is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.data import shard_cache
from client.node_settings import NodeSettings
from common.audit.canaries import canary_plan, inserts_canary_records
from common.config import RunConfig
from common.data.checks import DataFileError, reader_said
from common.data.datasets import load_raw_training_sites, normalise_images, training_sources
from common.data.features import compute_features
from common.data.local_files import load_local_arrays, local_sources
from common.data.partitioning import PartitionSpec, partition_indices, split_local
from common.tasks.registry import built_in_modules, get_task, task_module

log = logging.getLogger("privfed.client")
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")
CHEAP_SHARD_S = 0.01  # a simulated partition built faster than this is not cached
# Recipes (less the partition) whose partitions built cheaply in this process: their
# next partitions are built without looking in the cache first.
_CHEAP: set[ShardRecipe] = set()
# The code a cached shard depends on: a change to any of them invalidates every entry.
SHARD_CODE = (
    "client.data.local_data",
    "client.data.shard_cache",
    "common.audit.canaries",
    "common.data.checks",
    "common.data.datasets",
    "common.data.features",
    "common.data.scattering_port",
    "common.data.idx",
    "common.data.local_files",
    "common.data.partitioning",
    "common.tasks.preprocessing",
    "common.tasks.registry",
    "common.tasks.task",
    "common.tasks.text",  # the text tasks' reader and tokenisation
    "common.tasks.text_device",  # a text task's node-local CSV
)
SHARD_LIBRARIES = (
    "numpy", "torch", "scikit-learn", "flwr-datasets", "datasets", "kymatio",
    "tokenizers", "transformers",  # a text task's shard is its tokenizer's output
)  # fmt: skip


@dataclass(frozen=True)
class ClientShard:
    """Local train and local test tensors of one client."""

    partition_id: int  # -1 for a node's own data
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


@dataclass(frozen=True)
class ShardRecipe:
    """Everything a shard is made from; nothing else is read when building it."""

    task: str  # the run key's value: a built-in name or "module:attribute"
    features: str
    seed: int
    local_test_fraction: float
    sources: tuple[tuple[str, str], ...]  # (path, SHA-256) of every file the build reads
    data_path: str | None = None  # a node's own data, else a partition of the dataset
    data_dir: str = ""
    partition: PartitionSpec | None = None
    partition_id: int = -1
    canaries: int = 0  # audit canary records of the run (0: none inserted)

    def __post_init__(self) -> None:
        if (self.data_path is None) == (self.partition is None):
            raise ValueError("a shard recipe needs either a data path or a partition")

    @classmethod
    def for_node(cls, cfg: RunConfig, node: NodeSettings) -> ShardRecipe:
        """The recipe of this node's shard, with its files hashed (checked by path)."""
        if node.data_path is not None:
            files = local_sources(node.data_path, cfg.task)  # text: + tokenizer files
            common = {"data_path": node.data_path}
        else:
            assert node.partition_id is not None and node.num_partitions is not None
            files = training_sources(cfg.task, cfg.data_dir)
            common = {
                "data_dir": cfg.data_dir,
                "partition": PartitionSpec.for_run(cfg, node.num_partitions),
                "partition_id": node.partition_id,
                "canaries": cfg.audit_canaries if inserts_canary_records(cfg) else 0,
            }
        return cls(
            task=cfg.task,
            features=cfg.features,
            seed=cfg.seed,
            local_test_fraction=cfg.local_test_fraction,
            sources=_hashed(files, remember=node.data_path is None),
            **common,
        )

    def description(self) -> dict[str, Any]:
        """The recipe as plain data (for the key and the cache manifest)."""
        return {"recipe": json.loads(json.dumps(dataclasses.asdict(self)))}

    def cache_key(self) -> str:
        """SHA-256 of the recipe, the shard code's source and the library versions."""
        payload = {
            **self.description(),
            "format": shard_cache.FORMAT,
            "code": _code_fingerprint(task_module(self.task)),
            "libraries": _library_versions(),
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _hashed(files: tuple[Path, ...], remember: bool) -> tuple[tuple[str, str], ...]:
    out = []
    for path in files:
        try:
            out.append((str(path), shard_cache.file_sha256(path, remember)))
        except OSError as exc:
            raise DataFileError(
                path, "cannot be read", "the node's data files must be readable",
                reader_said(exc),
            ) from exc  # fmt: skip
    return tuple(out)


@lru_cache(maxsize=4)
def _code_fingerprint(task_code: str | None) -> str:
    """Hash of the shard code, the built-in tasks and ``task_code`` (a user's task
    module: its reader and constants shape the shard as much as ours do)."""
    digest = hashlib.sha256()
    extra = (task_code,) if task_code and task_code not in built_in_modules() else ()
    for name in (*SHARD_CODE, *built_in_modules(), *extra):
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        digest.update(name.encode() + b"\0" + Path(module.__file__).read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in SHARD_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _split(
    x: np.ndarray,  # raw records, or preprocessed model input (a node's own data)
    y: np.ndarray,
    indices: np.ndarray,
    recipe: ShardRecipe,
    canaries: tuple[np.ndarray, np.ndarray] | None = None,  # (pool indices, labels)
) -> dict[str, np.ndarray]:
    """Local train/test split, preprocessed (if raw) and mapped to the model's input."""
    train_idx, test_idx = split_local(
        indices, recipe.local_test_fraction, recipe.seed, recipe.partition_id
    )
    y_train = y[train_idx]
    if canaries is not None:  # audit: included canaries train, with their wrong labels
        train_idx = np.concatenate([train_idx, canaries[0]])
        y_train = np.concatenate([y_train, canaries[1]])

    preprocessed = recipe.data_path is not None  # load_local_arrays preprocessed it

    def model_input(rows: np.ndarray) -> np.ndarray:
        images = x[rows] if preprocessed else normalise_images(recipe.task, x[rows])
        return compute_features(recipe.features, torch.from_numpy(images)).numpy()

    return {
        "x_train": model_input(train_idx),
        "y_train": np.asarray(y_train, dtype=np.int64),
        "x_test": model_input(test_idx),
        "y_test": np.asarray(y[test_idx], dtype=np.int64),
    }


def build_arrays(recipe: ShardRecipe) -> dict[str, np.ndarray]:
    """Load, check, partition and featurise: the shard's arrays, from ``recipe`` only."""
    if recipe.data_path is not None:
        x, y = load_local_arrays(recipe.data_path, recipe.task)
        return _split(x, y, np.arange(len(y)), recipe)
    assert recipe.partition is not None
    x_raw, y_all, sites = load_raw_training_sites(recipe.task, recipe.data_dir, recipe.seed)
    num_classes = get_task(recipe.task).num_classes
    shards = partition_indices(y_all, recipe.partition, num_classes, sites)
    indices = shards[recipe.partition_id]
    canaries = None
    if recipe.canaries:
        plan = canary_plan(recipe.seed, recipe.canaries, y_all, num_classes)
        indices, inserted = plan.split_partition(indices)
        canaries = (inserted, plan.labels_of(inserted))
    return _split(x_raw, y_all, indices, recipe, canaries)


def _cached_arrays(recipe: ShardRecipe, folder: str) -> dict[str, np.ndarray]:
    """The shard from the node's cache, built and stored there if absent or damaged."""
    family = dataclasses.replace(recipe, partition_id=-1)
    if recipe.data_path is None and family in _CHEAP:
        return build_arrays(recipe)  # the cache is a memo: built, the arrays are equal
    root = Path(folder).expanduser() / shard_cache.CACHE_DIR
    key = recipe.cache_key()
    try:
        arrays = shard_cache.read_entry(root, key, ARRAY_NAMES)
    except shard_cache.CacheDamaged as exc:
        log.warning("shard cache entry %s is damaged (%s); rebuilding it", root / key, exc)
        shard_cache.discard_entry(root, key)
        arrays = None
    if arrays is not None:
        log.debug("shard of partition %d read from %s", recipe.partition_id, root / key)
        return arrays
    started = time.perf_counter()
    arrays = build_arrays(recipe)
    if recipe.data_path is None and time.perf_counter() - started < CHEAP_SHARD_S:
        _CHEAP.add(family)
        log.debug(
            "shard of partition %d is cheaper to build than to cache", recipe.partition_id
        )
        return arrays
    # The run's dataset files are checked as their key was made (once per file state
    # in this process); a node's own data is hashed again.
    again = _hashed(tuple(Path(p) for p, _ in recipe.sources), recipe.data_path is None)
    if again != recipe.sources:
        log.warning("a data file changed while its shard was built; not caching it")
        return arrays
    try:
        shard_cache.write_entry(root, key, arrays, recipe.description())
        log.info("shard of partition %d built and cached in %s", recipe.partition_id, root)
    except OSError as exc:  # a full or read-only disk costs speed, not the round
        log.warning("could not cache the shard in %s: %s", root, exc)
    return arrays


# One entry per shard this process serves: a Ray worker serves several nodes, and a
# SuperNode with virtual clients loads each shard of a group twice (virtual_clients.py).
@lru_cache(maxsize=128)
def _shard(recipe: ShardRecipe, cache_folder: str | None) -> ClientShard:
    arrays = _cached_arrays(recipe, cache_folder) if cache_folder else build_arrays(recipe)
    return ClientShard(
        partition_id=recipe.partition_id,
        x_train=torch.from_numpy(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"]),
        x_test=torch.from_numpy(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"]),
        num_classes=get_task(recipe.task).num_classes,
    )


# The shards a virtual-client group message has loaded (see shards_kept_for_group).
_GROUP: ContextVar[dict[ShardRecipe, ClientShard] | None] = ContextVar(
    "privfed_group_shards", default=None
)


@contextmanager
def shards_kept_for_group() -> Iterator[None]:
    """Keep every shard loaded inside this block until it ends.

    A SuperNode's group message loads each client's shard twice (batched training,
    then the client's own handler); a group is larger than :func:`_shard`'s memo, so
    without this the second load reads the disk cache again (about 1 ms a client
    with 1,000 clients a round). The shards are dropped when the message ends.
    """
    token = _GROUP.set({})
    try:
        yield
    finally:
        _GROUP.reset(token)


def load_client_shard(cfg: RunConfig, node: NodeSettings) -> ClientShard:
    """The node's shard: its own ``data-path``, or its partition of the run's dataset.

    Cached in the node's folder (``node.ledger_dir``) when it has one.
    """
    recipe = ShardRecipe.for_node(cfg, node)
    kept = _GROUP.get()
    if kept is not None and recipe in kept:
        return kept[recipe]
    shard = _shard(recipe, node.ledger_dir)
    if kept is not None:
        kept[recipe] = shard
    return shard
