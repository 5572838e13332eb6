"""The strategy that runs each privacy mode, so ``make_strategy`` is a lookup.

The modes (their unit, description and noise) are :mod:`common.privacy.modes`'s;
this table binds each, variants included, to a factory. A mode common does not know
cannot be bound, and a test checks that every mode common lists is bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.privacy.modes import PRIVACY_MODES
from common.registry import Registry
from common.tasks.models import model_dimension
from server.checks.federation_ledger import DistributedLedger, FederationLedger
from server.secure_aggregation.strategy import SecureAggregationFedAvg
from server.strategies.client_level import ClientLevelFedAvg
from server.strategies.private_fedavg import PrivateFedAvg
from server.strategies.rules.registry import make_rule

# (cfg, results folder or None, Flower run id, the keyword arguments every strategy
# takes) -> the strategy.
StrategyFactory = Callable[[RunConfig, Path | None, int, dict[str, Any]], PrivateFedAvg]

STRATEGIES: Registry[StrategyFactory] = Registry("privacy-mode")


def register_strategy(
    mode: str, factory: StrategyFactory, *, replace: bool = False
) -> None:
    """Run privacy mode ``mode`` (common must know it) with ``factory``'s strategy."""
    PRIVACY_MODES.get(mode)
    STRATEGIES.register(mode, factory, replace=replace)


def strategy_factory(cfg: RunConfig) -> StrategyFactory:
    """The factory for the run's privacy mode (a variant such as secure aggregation
    included)."""
    return STRATEGIES.get(cfg.privacy.name)


def _ledger_folder(out_dir: Path | None) -> Path:
    if out_dir is None:
        raise ValueError("client-level DP needs the results folder for its ledger")
    return out_dir


def _fedavg(
    cfg: RunConfig, out_dir: Path | None, run_id: int, shared: dict[str, Any]
) -> PrivateFedAvg:
    """Sample-level DP (the clients' own) or none: FedAvg, or a robust rule."""
    return PrivateFedAvg(
        fraction_train=cfg.fraction_train, min_train_nodes=cfg.min_train_nodes,
        rule=make_rule(cfg), **shared,
    )  # fmt: skip


def _client_level(
    cfg: RunConfig, out_dir: Path | None, run_id: int, shared: dict[str, Any]
) -> PrivateFedAvg:
    """DP-FedAvg: Poisson cohorts (not fraction-train), the ledger in ``out_dir``."""
    ledger = FederationLedger(
        _ledger_folder(out_dir), cfg.accountant, cfg.delta,
        cfg.effective_epsilon_budget, run_id,
    )  # fmt: skip
    return ClientLevelFedAvg(cfg, ledger, **shared)


def _secure_aggregation(
    cfg: RunConfig, out_dir: Path | None, run_id: int, shared: dict[str, Any]
) -> PrivateFedAvg:
    """DP-FedAvg whose noise the clients add, under secure aggregation."""
    distributed = DistributedLedger(
        _ledger_folder(out_dir), cfg.delta, cfg.effective_epsilon_budget, run_id
    )
    return SecureAggregationFedAvg(cfg, distributed, model_dimension(cfg), **shared)


for _mode, _factory in (
    ("sample", _fedavg),
    ("none", _fedavg),
    ("client", _client_level),
    ("secure-aggregation", _secure_aggregation),
):
    register_strategy(_mode, _factory)
