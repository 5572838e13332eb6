"""The server's registries (strategy per privacy mode, rule per aggregation name) are
bound to common's names, and each strategy's state_dict round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedMedian

from common.aggregation_rules import (
    AGGREGATION_RULES,
    AggregationRule,
    register_aggregation_rule,
)
from common.config import RunConfig
from common.ledger.privacy_ledger import PrivacyLedger
from common.privacy.modes import PRIVACY_MODES, PrivacyMode, register_privacy_mode
from common.registry import UnknownName
from server.app import make_strategy
from server.results.checkpoint import (
    Checkpoint,
    CheckpointError,
    restore_strategy,
    strategy_state,
)
from server.secure_aggregation.strategy import SecureAggregationFedAvg
from server.strategies.client_level import ClientLevelFedAvg
from server.strategies.private_fedavg import PrivateFedAvg
from server.strategies.registry import STRATEGIES, register_strategy, strategy_factory
from server.strategies.rules.registry import RULE_BUILDERS, register_rule

NODES = [11, 12, 13, 14]


def test_every_common_name_is_bound_on_the_server() -> None:
    """Each privacy mode (variants included) has a strategy, each rule a builder."""
    assert set(STRATEGIES) == set(PRIVACY_MODES)
    assert set(RULE_BUILDERS) == set(AGGREGATION_RULES)


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ({}, PrivateFedAvg),
        ({"privacy_mode": "none", "target_epsilon": 0.0}, PrivateFedAvg),
        ({"privacy_mode": "client"}, ClientLevelFedAvg),
        ({"privacy_mode": "client", "secure_aggregation": True}, SecureAggregationFedAvg),
    ],
)
def test_make_strategy_looks_the_mode_up(
    tmp_path: Path, values: dict[str, object], kind: type
) -> None:
    """The run's mode picks the strategy class, as the old if-chain did."""
    cfg = RunConfig(**values)  # type: ignore[arg-type]
    assert type(make_strategy(cfg, tmp_path)) is kind
    if cfg.is_client_level:
        with pytest.raises(ValueError, match="needs the results folder"):
            make_strategy(cfg)


def test_the_server_binds_only_names_common_lists() -> None:
    """A rule or mode common does not know cannot be bound (no config could name it)."""
    with pytest.raises(UnknownName, match="'aggregation': must be one of 'fedavg'"):
        register_rule("geometric-median", lambda cfg: None)
    with pytest.raises(UnknownName, match="'privacy-mode'"):
        register_strategy("shuffle", lambda cfg, out, run, shared: PrivateFedAvg())


def test_a_new_rule_is_one_module_and_its_registration() -> None:
    """Registered in common (the name) and on the server (the builder), a rule is
    chosen by run key ``aggregation`` and built with the run's config."""

    class CappedMedian(FedMedian):
        """The rule a new module would define."""

    register_aggregation_rule(AggregationRule("capped-median"))
    register_rule("capped-median", lambda cfg: CappedMedian())
    try:
        strategy = make_strategy(RunConfig(aggregation="capped-median"))
        assert isinstance(strategy.rule, CappedMedian)
    finally:
        RULE_BUILDERS.unregister("capped-median")
        AGGREGATION_RULES.unregister("capped-median")


def test_a_rule_common_lists_but_the_server_cannot_build_is_refused() -> None:
    """A name valid in the config with no server module fails naming the key."""
    register_aggregation_rule(AggregationRule("unbuilt"))
    try:
        with pytest.raises(UnknownName, match="'aggregation'.*'krum', got 'unbuilt'"):
            make_strategy(RunConfig(aggregation="unbuilt"))
    finally:
        AGGREGATION_RULES.unregister("unbuilt")


def test_a_new_privacy_mode_is_one_description_and_one_factory() -> None:
    """A mode registered in common (unit, description, noise) and bound to a factory
    on the server is chosen by run key ``privacy-mode``."""

    class Shuffled(PrivateFedAvg):
        """The strategy a new mode would bring."""

    register_privacy_mode(
        PrivacyMode("shuffled", "record", "record-level DP, shuffled", "the clients'")
    )
    register_strategy("shuffled", lambda cfg, out, run, shared: Shuffled(**shared))
    try:
        cfg = RunConfig(privacy_mode="shuffled")
        assert cfg.privacy_unit == "record" and cfg.is_private
        assert strategy_factory(cfg) is STRATEGIES.get("shuffled")
        assert isinstance(make_strategy(cfg), Shuffled)
    finally:
        STRATEGIES.unregister("shuffled")
        PRIVACY_MODES.unregister("shuffled")


def _ledger(*rounds: int) -> PrivacyLedger:
    ledger = PrivacyLedger("rdp", 1e-5)
    for server_round in rounds:
        ledger = ledger.extended(server_round, 1.0, 0.1, 10, run_id=1)
    return ledger


def test_private_fedavg_state_round_trips() -> None:
    """The validator's accepted ledgers survive state_dict -> load_state_dict."""
    first = make_strategy(RunConfig())
    assert first.validator is not None
    first.validator.accepted.update({5: _ledger(1, 2), 7: _ledger(2)})
    state = first.state_dict()
    assert set(state) == {"validator"} and set(state["validator"]) == {"5", "7"}
    resumed = make_strategy(RunConfig())
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state == strategy_state(first)
    assert resumed.validator is not None and resumed.validator.accepted[5] == _ledger(1, 2)
    first.validator = None
    assert first.state_dict() == {}


def test_client_level_state_extends_the_parents_and_round_trips(tmp_path: Path) -> None:
    """The central mechanism's block (the keys checkpoint.pt has always held) is added
    to PrivateFedAvg's once start_run has fixed it, and loads back unchanged."""
    cfg = RunConfig(privacy_mode="client", target_epsilon=0.0, noise_multiplier=1.0)
    first = make_strategy(cfg, tmp_path, run_id=1)
    assert first.state_dict() == {"validator": {}}  # no mechanism before start_run
    first.start_run(NODES)
    assert first.dp is not None
    first.dp.clip_norm = 0.37
    first.ledger.record_round(1, 1.0, cfg.client_sampling_rate, {})
    state = first.state_dict()
    assert state == {
        "validator": {},
        "client_level": {
            "clip_norm": 0.37,
            "population": 4,
            "noise_multiplier": 1.0,
            "ledger": first.ledger.ledger.to_dict(),
        },
    }
    resumed = make_strategy(cfg, tmp_path, run_id=2)
    resumed.start_run(NODES)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


def test_a_missing_mechanism_state_is_refused_by_the_checkpoint(tmp_path: Path) -> None:
    """restore_strategy turns a strategy's refusal into a CheckpointError."""
    cfg = RunConfig(privacy_mode="client", target_epsilon=0.0, noise_multiplier=1.0)
    strategy = make_strategy(cfg, tmp_path)
    strategy.start_run(NODES)
    ckpt = Checkpoint(1, {}, None, {"validator": {}}, {}, (), {"round": 1}, {})
    with pytest.raises(CheckpointError, match="no client-level state"):
        restore_strategy(strategy, ckpt)


def test_secure_aggregation_state_replaces_the_central_block(tmp_path: Path) -> None:
    """Its mechanism's state is stored under its own key and round-trips."""
    cfg = RunConfig(
        privacy_mode="client", secure_aggregation=True, client_sampling_rate=1.0,
        target_epsilon=0.0, noise_multiplier=1.0, delta=1e-3,
        secagg_min_contributors=0.6,
    )  # fmt: skip
    first = make_strategy(cfg, tmp_path, run_id=1)
    assert isinstance(first, SecureAggregationFedAvg)
    first.start_run(NODES)
    assert first.planned is not None
    release = first.planned.release(first.planned.min_contributors, 1.0)
    first.distributed.record_round(1, release, {}, {})
    state = first.state_dict()
    assert set(state) == {"validator", "secure_aggregation"}
    resumed = make_strategy(cfg, tmp_path, run_id=2)
    resumed.start_run(NODES)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
