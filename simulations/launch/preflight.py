"""Check the run keys that need the data, before the launcher starts any process.

A simulated or locally deployed run splits the run's dataset into one partition
per client, so the launcher can do what each client would do first: split the
data, plan its first DP-SGD round and check it against the budget and δ, with the
same code (``common.data.partitioning``, ``common.privacy.round_decision``). A setting every
client would refuse only after start-up fails here, naming the key, instead.
"""

from __future__ import annotations

import math
import warnings

from common.audit.canaries import canary_plan, inserts_canary_records
from common.config import ConfigError, RunConfig
from common.data.datasets import DatasetError, load_raw_training_sites
from common.data.partitioning import (
    PartitionError,
    PartitionSpec,
    partition_indices,
    split_local,
)
from common.ledger.privacy_ledger import PrivacyLedger
from common.privacy.dp_sgd_plan import plan_dp_sgd_round
from common.privacy.round_decision import decide_round, delta_allows_record_release
from common.tasks.registry import get_task


def partition_sizes(cfg: RunConfig, num_partitions: int) -> list[int]:
    """Training records of each partition, as its client would split them."""
    try:  # labels and sites only: nothing to preprocess (as a client reads them)
        _, y_train, sites = load_raw_training_sites(cfg.task, cfg.data_dir, cfg.seed)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    if num_partitions > len(y_train):
        raise ConfigError(
            f"--clients {num_partitions}: more clients than the {len(y_train)} "
            f"training records of task {cfg.task}; every client needs at least one"
        )
    spec = PartitionSpec.for_run(cfg, num_partitions)
    num_classes = get_task(cfg.task).num_classes
    try:
        shards = partition_indices(y_train, spec, num_classes, sites)
    except PartitionError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # e.g. flwr-datasets' Dirichlet gives up on α
        raise ConfigError(
            f"run config key 'partitioner': cannot split task {cfg.task} "
            f"{cfg.partitioner}-wise over {num_partitions} clients "
            f"(dirichlet-alpha={cfg.dirichlet_alpha:g}, classes-per-client="
            f"{cfg.classes_per_client}): {exc}"
        ) from None
    sizes = []
    for pid, indices in enumerate(shards):
        if len(indices) == 0:
            raise ConfigError(
                f"run config key 'partitioner': {cfg.partitioner} over "
                f"{num_partitions} clients leaves partition {pid} without records"
            )
        try:
            train, _ = split_local(indices, cfg.local_test_fraction, cfg.seed, pid)
        except PartitionError as exc:
            raise ConfigError(f"run config key 'local-test-fraction': {exc}") from None
        sizes.append(len(train))
    return sizes


def check_federation(cfg: RunConfig, num_partitions: int) -> None:
    """Raise :class:`ConfigError`, naming the key, if a client could not train round 1.

    Privacy checks mirror a fresh client's first round (an empty ledger; a
    simulated client plans from its exact record count N). δ must be below 1/N
    for every partition. The budget is checked on the partition sampled at the
    largest rate q (the fewest batches per epoch): over the same number of
    epochs it needs the most noise for a given ε, and one of its rounds costs the
    most ε at a given σ, so if it fits, every partition fits.
    """
    sizes = partition_sizes(cfg, num_partitions)
    if inserts_canary_records(cfg):  # audit-canaries must fit the training pool
        _, y_train, _ = load_raw_training_sites(cfg.task, cfg.data_dir, cfg.seed)
        canary_plan(cfg.seed, cfg.audit_canaries, y_train, get_task(cfg.task).num_classes)
    if not cfg.is_private:
        return
    for pid, n in enumerate(sizes):
        if delta_allows_record_release(cfg.delta, n):
            raise ConfigError(
                f"run config key 'delta': δ = {cfg.delta:g} is not below 1/N for "
                f"partition {pid} (N = {n} training records; a δ that large allows "
                f"releasing a whole record); use delta < {1 / n:.3g}"
            )
    plans = {}
    for pid, n in enumerate(sizes):
        try:
            plans[pid] = plan_dp_sgd_round(n, cfg.batch_size, cfg.local_epochs)
        except ValueError as exc:
            raise ConfigError(f"partition {pid} (N = {n}): {exc}") from None
    pid = max(plans, key=lambda p: (plans[p].sample_rate, -sizes[p]))
    fresh = PrivacyLedger(cfg.accountant, cfg.delta)
    try:
        with warnings.catch_warnings():  # Opacus' note on the RDP order range
            warnings.simplefilter("ignore", UserWarning)
            decision = decide_round(cfg, sizes[pid], fresh, math.inf)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            f"run config key 'target-epsilon': {cfg.target_epsilon:g} is too small to "
            f"calibrate σ for {cfg.num_rounds} round(s) of partition {pid} "
            f"(N = {sizes[pid]}, q = {plans[pid].sample_rate:.4g}, "
            f"{plans[pid].steps} steps per round): {exc}"
        ) from None
    if not decision.allowed:
        key = "epsilon-budget" if cfg.epsilon_budget > 0 else "target-epsilon"
        raise ConfigError(
            f"run config key '{key}': a budget of ε = {decision.budget:g} is too small "
            f"for one round: partition {pid}'s first round (σ = "
            f"{decision.noise_multiplier:.4g}, q = {decision.plan.sample_rate:.4g}, "
            f"{decision.plan.steps} steps) costs ε = {decision.epsilon_after:.4g} "
            f"({fresh.accountant_name}, δ = {cfg.delta:g}); no client could train"
        )
