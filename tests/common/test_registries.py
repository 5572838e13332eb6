"""The accountant, aggregation-rule and privacy-mode registries: names, errors, and
that one module plus one registration makes a new entry selectable."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from common.aggregation_rules import (
    AGGREGATION_RULES,
    AggregationRule,
    aggregation_names,
    register_aggregation_rule,
)
from common.config import ConfigError, RunConfig, noise_statement
from common.ledger.privacy_ledger import LedgerError, PrivacyLedger, epsilon_of_history
from common.privacy.accountants import rdp
from common.privacy.accountants.registry import (
    ACCOUNTANTS as ACCOUNTANT_REGISTRY,
)
from common.privacy.accountants.registry import (
    accountant_names,
    get_accountant,
    register_accountant,
)
from common.privacy.dp_sgd_plan import calibrate_gaussian_noise_multiplier
from common.privacy.modes import (
    PRIVACY_MODES as MODE_REGISTRY,
)
from common.privacy.modes import (
    PrivacyMode,
    mode_of,
    privacy_mode_names,
    register_privacy_mode,
)
from common.registry import Registry, UnknownName
from common.run_keys import ACCOUNTANTS, AGGREGATIONS, PRIVACY_MODES

HISTORY = [(1.1, 0.01, 500)]


def test_each_registry_lists_its_names() -> None:
    """The config's choice lists are the registries' names, in registration order."""
    assert accountant_names() == ACCOUNTANTS == ("rdp", "prv")
    assert (
        aggregation_names() == AGGREGATIONS == ("fedavg", "median", "trimmed-mean", "krum")
    )
    assert privacy_mode_names() == PRIVACY_MODES == ("sample", "client", "none")
    assert MODE_REGISTRY.names() == ("sample", "client", "none", "secure-aggregation")
    assert [AGGREGATION_RULES.get(n).mean for n in AGGREGATIONS] == [True] + [False] * 3


@pytest.mark.parametrize(
    ("registry", "key", "allowed"),
    [
        (ACCOUNTANT_REGISTRY, "accountant", "'rdp', 'prv'"),
        (AGGREGATION_RULES, "aggregation", "'fedavg', 'median', 'trimmed-mean', 'krum'"),
        (MODE_REGISTRY, "privacy-mode", "'sample', 'client', 'none'"),
    ],
)
def test_an_unknown_name_names_the_run_key_and_the_allowed_names(
    registry: Registry[object], key: str, allowed: str
) -> None:
    """Looking up a name nobody registered is a ConfigError like the config's own."""
    with pytest.raises(UnknownName) as info:
        registry.get("nope")
    assert isinstance(info.value, ConfigError)
    assert f"run config key '{key}'" in str(info.value)
    assert allowed in str(info.value) and "'nope'" in str(info.value)
    with pytest.raises(ConfigError, match=f"'{key}': must be one of {allowed}"):
        RunConfig(**{key.replace("-", "_"): "nope"})  # type: ignore[arg-type]


def test_unknown_accountant_is_refused_by_lookups_and_ledgers() -> None:
    """get_accountant and epsilon_of_history name the key; a stored ledger naming an
    unknown accountant stays a LedgerError that lists the allowed ones."""
    with pytest.raises(UnknownName, match="'accountant'.*'rdp', 'prv'"):
        get_accountant("gdp")
    with pytest.raises(UnknownName, match="'accountant'"):
        epsilon_of_history(HISTORY, 1e-5, "gdp")
    with pytest.raises(
        LedgerError, match="unknown accountant 'gdp'; allowed: 'rdp', 'prv'"
    ):
        PrivacyLedger("gdp", 1e-5)


def test_registry_refuses_a_second_registration_and_bad_names() -> None:
    """A name is registered once unless replaced; names are lower-case text."""
    registry: Registry[int] = Registry("some-key", {"a": 1})
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", 2)
    registry.register("a", 2, replace=True)
    assert registry.get("a") == 2 and "a" in registry and list(registry) == ["a"]
    for bad in ("", "Upper", " a"):
        with pytest.raises(ValueError, match="lower-case"):
            registry.register(bad, 3)
    registry.unregister("a")
    assert registry.names() == ()


def test_accountant_names_and_modules() -> None:
    """Each built-in module states the full name printed beside ε."""
    assert get_accountant("rdp").NAME == "opacus-rdp"
    assert get_accountant("prv").NAME == "opacus-prv"
    assert PrivacyLedger("prv", 1e-5).accountant_name == "opacus-prv"


@pytest.fixture
def doubled_rdp() -> Iterator[str]:
    """An accountant registered by a test: one module (here in sys.modules) that
    reports twice RDP's ε, plus one register_accountant."""
    module = types.ModuleType("tests_doubled_rdp")
    module.NAME = "doubled-rdp"  # type: ignore[attr-defined]
    module.make = rdp.make  # type: ignore[attr-defined]
    module.epsilon = lambda history, delta: 2 * rdp.epsilon(history, delta)  # type: ignore[attr-defined]
    module.noise_multiplier = lambda eps, *rest: rdp.noise_multiplier(eps / 2, *rest)  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    register_accountant("doubled", module.__name__)
    yield "doubled"
    ACCOUNTANT_REGISTRY.unregister("doubled")
    del sys.modules[module.__name__]


def test_a_registered_accountant_is_selectable_everywhere(doubled_rdp: str) -> None:
    """Run config, ledger, ε and σ calibration all take the new name."""
    cfg = RunConfig(accountant=doubled_rdp)
    assert doubled_rdp in accountant_names()
    ledger = PrivacyLedger(cfg.accountant, 1e-5).extended(1, 1.1, 0.01, 500)
    assert ledger.accountant_name == "doubled-rdp"
    assert ledger.epsilon() == pytest.approx(2 * epsilon_of_history(HISTORY, 1e-5, "rdp"))
    sigma = calibrate_gaussian_noise_multiplier(4.0, 1e-5, 0.01, 500, doubled_rdp)
    assert sigma == calibrate_gaussian_noise_multiplier(2.0, 1e-5, 0.01, 500, "rdp")


def test_a_registered_rule_is_selectable_in_the_run_config() -> None:
    """One registration in common makes the name valid for every process."""
    with pytest.raises(ConfigError, match="'aggregation'"):
        RunConfig(aggregation="geometric-median")
    register_aggregation_rule(AggregationRule("geometric-median"))
    try:
        assert RunConfig(aggregation="geometric-median").aggregation == "geometric-median"
        with pytest.raises(ConfigError, match="aggregation='fedavg'"):
            RunConfig(aggregation="geometric-median", privacy_mode="client")
    finally:
        AGGREGATION_RULES.unregister("geometric-median")


@pytest.mark.parametrize(
    ("values", "name", "unit"),
    [
        ({}, "sample", "record"),
        ({"privacy_mode": "client"}, "client", "client"),
        ({"privacy_mode": "none", "target_epsilon": 0.0}, "none", None),
        (
            {"privacy_mode": "client", "secure_aggregation": True},
            "secure-aggregation",
            "client",
        ),
    ],
)
def test_the_run_mode_comes_from_the_registry(
    values: dict[str, object], name: str, unit: str | None
) -> None:
    """privacy-mode picks the mode; secure-aggregation = true picks client's variant."""
    cfg = RunConfig(**values)  # type: ignore[arg-type]
    assert mode_of(cfg).name == cfg.privacy.name == name
    assert cfg.privacy_unit == unit
    assert cfg.is_private == (unit == "record")
    assert cfg.is_client_level == (unit == "client")


@pytest.mark.parametrize(
    ("values", "statement"),
    [
        ({}, "fresh OS entropy per client and round: not reproducible, not replayable"),
        (
            {"reproducible_noise": True},
            "noise reproducible from the seed: not private against the server",
        ),
        (
            {"privacy_mode": "client"},
            "client-level: the server adds the noise to the sum of clipped updates "
            "from fresh OS entropy each round",
        ),
        (
            {"privacy_mode": "client", "reproducible_noise": True},
            "client-level: the server adds the noise to the sum of clipped updates "
            "from a generator seeded from the run seed (reproducible; not private)",
        ),
        (
            {"privacy_mode": "none", "target_epsilon": 0.0, "reproducible_noise": True},
            "no DP noise (non-private run)",
        ),
        (
            {"privacy_mode": "client", "secure_aggregation": True},
            "client-level, distributed: each client adds its share of Skellam noise "
            "from fresh OS entropy before secure aggregation masks its update",
        ),
    ],
)
def test_noise_statements_are_unchanged(values: dict[str, object], statement: str) -> None:
    """summary.json's and the log's noise text, as before the registry."""
    assert noise_statement(RunConfig(**values)) == statement  # type: ignore[arg-type]


def test_privacy_modes_are_validated_and_variants_need_a_base() -> None:
    """A mode's unit is record, client or none; a variant names its base and key."""
    with pytest.raises(ValueError, match="unit"):
        PrivacyMode("x", "device", "d", "n")
    with pytest.raises(ValueError, match="enabled_by"):
        PrivacyMode("x", "client", "d", "n", variant_of="client")
    with pytest.raises(UnknownName, match="'privacy-mode'"):
        register_privacy_mode(
            PrivacyMode("x", "client", "d", "n", variant_of="nope", enabled_by="resume")
        )
