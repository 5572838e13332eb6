"""Run config: every bad value of every key fails before round 1, naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, RunConfig
from common.run_keys import RULES, check_key

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = RunConfig().to_run_config()

# For every key: values that must be refused (wrong type first, then out of range).
BAD_VALUES: dict[str, list[Any]] = {
    "task": [3, "cifar-10", "", "no colon.module"],
    "data-dir": [1, True],
    "num-rounds": ["5", 2.5, True, 0, -1, 100_001],
    "fraction-train": ["1", True, 0.0, -0.1, 1.5],
    "fraction-evaluate": ["x", -0.5, 1.01],
    "min-train-nodes": [1.5, "2", 0],
    "min-available-nodes": [False, 0, -3],
    "node-wait-timeout": ["60", 0, -1.0],
    "round-timeout": [[], 0.0],
    "features": [1, "scatter", "Pixels"],
    "partitioner": [1, "shard", "IID"],
    "dirichlet-alpha": ["0.5", 0.0, -1.0],
    "classes-per-client": [2.0, 0, 11],
    "local-test-fraction": ["0.1", -0.1, 0.51],
    "seed": [1.0, "42", -1, 2**32],
    "local-epochs": [1.0, 0, 1001],
    "batch-size": ["32", 0, -4],
    "learning-rate": ["0.1", 0.0, -1.0, 101.0],
    "momentum": ["0.9", -0.1, 1.0],
    "server-learning-rate": [0, -1.0, 101.0, "1"],
    "server-momentum": [-0.1, 1.0, "0.9"],
    "privacy-mode": ["user", True, "record"],
    "max-grad-norm": ["1", 0.0, -2.0],
    "client-sampling-rate": [0.0, 1.5, -0.1, "0.1"],
    "clipping": ["flat", 1, ""],
    "client-clip-norm": [0.0, -1.0, "1"],
    "target-clip-quantile": [0.0, 1.0, 1.5],
    "clip-learning-rate": [0.0, 11.0, "0.2"],
    "clipped-count-stddev": [-1.0, "1"],
    "noise-multiplier": ["1.0", -0.5],
    "target-epsilon": ["3", -1.0],
    "epsilon-budget": ["5", -2.0],
    "delta": ["1e-5", 0.0, 1.0, -1e-5],
    "accountant": [1, "gdp", "RDP"],
    "grad-sample-mode": [0, "fastest"],
    "reproducible-noise": [0, "true", 1.0],
    "torch-threads": [1.5, 0, 257],
    "virtual-clients": [1.5, -1, 10_000_001, "12"],
    "results-dir": [0, None],
    "export-compression": [8, "INT8", "int4", "prune", True],
    "update-compression": [4, "INT4", "int3", "int16", "float32", "", True],
    "max-update-norm": ["1", -1.0, True, float("inf"), float("nan")],
    "aggregation": [0, "mean", "Median", "multikrum", ""],
    "trim-fraction": [-0.1, 0.5, 1.0, "0.2"],
    "krum-byzantine": [-1, 1.5, True, "2"],
    "resume": [1, "true", None],
    "audit": [True, "on", "one-shot", 1],
    "audit-canaries": [1, 0, -5, 2.5, True, "1000"],
    "secure-aggregation": [1, "true", None],
    "secagg-num-shares": [2, 0, 3.5, True, "15"],
    "secagg-reconstruction-threshold": [0.5, 0.0, 1.01, "0.6", True],
    "secagg-min-contributors": [0.0, -0.1, 1.5, "0.9"],
    "secagg-modulus-range": [100, 2**7, 2**33, 65536.0, True],
    "secagg-clipping-range": [-1.0, "0", float("inf")],
    "secagg-timeout": [0, -1.0, "60"],
    "lora-rank": [-1, 513, 8.0, True, "8"],
    "lora-alpha": [0.0, -1.0, 5000.0, "16"],
    "lora-target-modules": ["", "query,", "query,query", "9layer", "a b", 1],
}


def test_every_key_has_bad_values_listed() -> None:
    """The table above covers every run key (a new key must add its bad values)."""
    assert set(BAD_VALUES) == set(RULES)


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in BAD_VALUES.items() for v in values]
)
def test_bad_value_fails_naming_the_key(key: str, value: Any) -> None:
    """Each bad value raises ConfigError whose message names the key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({**DEFAULTS, key: value})
    message = str(info.value)
    assert f"'{key}'" in message
    assert "must be" in message or "set exactly one" in message


def test_unknown_key_is_named() -> None:
    """A key that does not exist fails and lists the allowed keys."""
    with pytest.raises(ConfigError, match="'batchsize'.*allowed keys: .*batch-size"):
        RunConfig.from_run_config({**DEFAULTS, "batchsize": 32})


def test_int_for_float_key() -> None:
    """An int for a float key is converted, not refused."""
    cfg = RunConfig.from_run_config({**DEFAULTS, "target-epsilon": 3, "learning-rate": 2})
    assert cfg.target_epsilon == 3.0 and isinstance(cfg.target_epsilon, float)
    assert isinstance(cfg.learning_rate, float)


def test_pyproject_table_matches_the_code() -> None:
    """pyproject's [tool.flwr.app.config] has exactly the keys and defaults of RunConfig."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(RULES)
    assert RunConfig.from_run_config(table) == RunConfig()


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ({"target-epsilon": 3.0, "noise-multiplier": 1.0}, ("'target-epsilon'",)),
        ({"target-epsilon": 0.0, "noise-multiplier": 0.0}, ("'noise-multiplier'",)),
        ({"min-train-nodes": 5, "min-available-nodes": 3}, ("'min-train-nodes'",)),
        (
            {"local-test-fraction": 0.0, "fraction-evaluate": 0.5},
            ("'local-test-fraction'",),
        ),
        (
            {"privacy-mode": "client", "aggregation": "median"},
            ("'aggregation'", "'privacy-mode'"),
        ),
    ],
)
def test_cross_key_rules_name_the_keys(overrides: dict[str, Any], keys: tuple[str]) -> None:
    """Contradictory keys fail naming them."""
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({**DEFAULTS, **overrides})
    for key in keys:
        assert key in str(info.value)


def test_non_private_mode_needs_no_noise() -> None:
    """privacy-mode='none' accepts σ = 0 and no target, and has no budget."""
    cfg = RunConfig(privacy_mode="none", target_epsilon=0.0)
    assert not cfg.is_private
    assert cfg.effective_epsilon_budget == float("inf")


@pytest.mark.parametrize(
    ("target", "sigma", "budget", "expected"),
    [
        (8.0, 0.0, 0.0, 8.0),  # the target is the budget
        (8.0, 0.0, 5.0, 5.0),  # an explicit budget wins
        (0.0, 1.0, 0.0, float("inf")),  # fixed σ, no cap
        (0.0, 1.0, 2.5, 2.5),
    ],
)
def test_effective_budget(
    target: float, sigma: float, budget: float, expected: float
) -> None:
    """epsilon-budget 0 means target-epsilon, or no cap when σ is fixed."""
    cfg = RunConfig(target_epsilon=target, noise_multiplier=sigma, epsilon_budget=budget)
    assert cfg.effective_epsilon_budget == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (key, value)
        for key, rule in RULES.items()
        if rule.kind is float
        for value in (float("inf"), float("-inf"), float("nan"))
    ],
)
def test_non_finite_numbers_are_refused(key: str, value: float) -> None:
    """TOML's inf and nan fail for every number key, naming it (no key means ∞)."""
    with pytest.raises(ConfigError, match=f"'{key}': must be a finite number"):
        RunConfig.from_run_config({**DEFAULTS, key: value})
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_key(key, value)


def test_check_key_checks_one_value() -> None:
    """check_key (used for each --set item) refuses a wrong type or range, or a typo."""
    assert check_key("learning-rate", 2) == 2.0
    with pytest.raises(ConfigError, match="'results-dir': must be a directory path"):
        check_key("results-dir", 5)
    with pytest.raises(ConfigError, match="'batch-size': must be an integer >= 1"):
        check_key("batch-size", 0)
    with pytest.raises(ConfigError, match="unknown run config key 'batchsize'"):
        check_key("batchsize", 32)


@pytest.mark.parametrize(
    ("key", "value"),
    [("privacy-mode", "sample"), ("clipping", "adaptive"), ("accountant", "prv"),
     ("reproducible-noise", True), ("audit", "one-run")],
)  # fmt: skip
def test_secure_aggregation_refuses_what_it_cannot_distribute(key: str, value: Any) -> None:
    """Secure aggregation needs client-level DP with fixed clipping, RDP, OS-entropy
    noise and no audit; anything else fails naming both keys."""
    base = {**DEFAULTS, "privacy-mode": "client", "secure-aggregation": True}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({**base, key: value})
    assert "'secure-aggregation'" in str(info.value) and f"'{key}'" in str(info.value)


def test_a_run_config_is_parsed_once_per_process_and_checked_every_time() -> None:
    """run_config_of shares one frozen RunConfig per distinct config (a SuperNode asks
    once per virtual client); a bad config is refused at every call, never kept."""
    from common.config import run_config_of

    raw = RunConfig(num_rounds=3).to_run_config()
    first = run_config_of(raw)
    assert first == RunConfig.from_run_config(raw)
    assert run_config_of(dict(reversed(list(raw.items())))) is first  # order-free
    other = run_config_of({**raw, "num-rounds": 4})
    assert other is not first and other.num_rounds == 4
    for _ in range(2):
        with pytest.raises(ConfigError, match="num-rounds"):
            run_config_of({**raw, "num-rounds": 0})
    with pytest.raises(ConfigError, match="unknown run config key"):
        run_config_of({**raw, "no-such-key": ["a", "list"]})  # unhashable: parsed anyway
