"""The run keys: each key's type and what it accepts, checked one key at a time.

Every key a run can vary lives in ``[tool.flwr.app.config]`` of ``pyproject.toml``
(docs/run-keys.md). This module is the one home of each key's rule and of the
option names a key accepts; :class:`common.config.RunConfig` applies the rules to a
whole config and adds the rules that span keys. A bad value is a
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.aggregation_rules import aggregation_names
from common.errors import ConfigError
from common.privacy.accountants.registry import accountant_names
from common.privacy.modes import privacy_mode_names
from common.tasks.registry import is_task_reference, task_names

TASKS = task_names()  # common/tasks/registry.py (lists names, imports no task)
# "sites": one client per natural site of a task whose records carry one.
PARTITIONERS = ("iid", "dirichlet", "inner-dirichlet", "pathological", "sites")
ACCOUNTANTS = accountant_names()  # common/privacy/accountants/registry.py
PRIVACY_MODES = privacy_mode_names()  # common/privacy/modes.py
CLIPPING_MODES = ("fixed", "adaptive")  # client-level update clipping
GRAD_SAMPLE_MODES = ("direct", "hooks", "ew", "functorch", "ghost")
FEATURE_MAPS = ("pixels", "scattering")  # see common/data/features.py
EXPORT_COMPRESSIONS = ("none", "int8", "int8+prune")  # see server/export/compression.py
UPDATE_COMPRESSIONS = (
    "none",
    "float16",
    "int8",
    "int4",
    "int2",
)  # wire/update_codec.py
AGGREGATIONS = aggregation_names()  # common/aggregation_rules.py
AUDIT_MODES = ("off", "one-run")  # empirical privacy audit, simulation only


@dataclass(frozen=True)
class _Rule:
    kind: type  # int, float, str or bool
    check: Callable[[Any], bool]
    describe: str | Callable[[], str]  # what is allowed; a callable for a registry's

    @property
    def allowed(self) -> str:
        """What the key accepts, as an error message states it."""
        return self.describe if isinstance(self.describe, str) else self.describe()


def _choice(options: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> _Rule:
    """One of ``options``; a callable (a registry's names) is asked at each check,
    so a name registered later is accepted."""
    names = options if callable(options) else lambda: options
    return _Rule(
        str, lambda v: v in names(), lambda: "one of " + ", ".join(map(repr, names()))
    )


# Rules keyed by run-config key (dashes); the dataclass field is the key with
# underscores.
RULES: dict[str, _Rule] = {
    "task": _Rule(
        str,
        lambda v: v in task_names() or is_task_reference(v),
        lambda: (
            "one of "
            + ", ".join(map(repr, task_names()))
            + " or 'package.module:attribute' (docs/tasks.md)"
        ),
    ),
    "data-dir": _Rule(str, lambda v: True, "a directory path, or '' for the default"),
    "num-rounds": _Rule(int, lambda v: 1 <= v <= 100_000, "an integer in [1, 100000]"),
    "fraction-train": _Rule(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "fraction-evaluate": _Rule(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "min-train-nodes": _Rule(int, lambda v: v >= 1, "an integer >= 1"),
    "min-available-nodes": _Rule(int, lambda v: v >= 1, "an integer >= 1"),
    "node-wait-timeout": _Rule(float, lambda v: v > 0, "a number of seconds > 0"),
    "round-timeout": _Rule(float, lambda v: v > 0, "a number of seconds > 0"),
    "features": _choice(FEATURE_MAPS),
    "partitioner": _choice(PARTITIONERS),
    "dirichlet-alpha": _Rule(float, lambda v: v > 0, "a number > 0"),
    "classes-per-client": _Rule(int, lambda v: v >= 1, "an integer >= 1"),
    "local-test-fraction": _Rule(float, lambda v: 0 <= v <= 0.5, "a number in [0, 0.5]"),
    "seed": _Rule(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "local-epochs": _Rule(int, lambda v: 1 <= v <= 1000, "an integer in [1, 1000]"),
    "batch-size": _Rule(int, lambda v: v >= 1, "an integer >= 1"),
    "learning-rate": _Rule(float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "momentum": _Rule(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "server-learning-rate": _Rule(float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "server-momentum": _Rule(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "privacy-mode": _choice(privacy_mode_names),
    "max-grad-norm": _Rule(float, lambda v: v > 0, "a number > 0"),
    "client-sampling-rate": _Rule(float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "clipping": _choice(CLIPPING_MODES),
    "client-clip-norm": _Rule(float, lambda v: v > 0, "a number > 0"),
    "target-clip-quantile": _Rule(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "clip-learning-rate": _Rule(float, lambda v: 0 < v <= 10, "a number in (0, 10]"),
    "clipped-count-stddev": _Rule(
        float, lambda v: v >= 0, "a number >= 0 (0 = expected cohort / 20)"
    ),
    "noise-multiplier": _Rule(float, lambda v: v >= 0, "a number >= 0 (0 = unset)"),
    "target-epsilon": _Rule(float, lambda v: v >= 0, "a number >= 0 (0 = unset)"),
    "epsilon-budget": _Rule(
        float, lambda v: v >= 0, "a number >= 0 (0 = see docs/run-keys.md)"
    ),
    "delta": _Rule(float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "accountant": _choice(accountant_names),
    "grad-sample-mode": _choice(GRAD_SAMPLE_MODES),
    "reproducible-noise": _Rule(
        bool, lambda v: True, "true or false (true: noise replayable from the seed)"
    ),
    "torch-threads": _Rule(int, lambda v: 1 <= v <= 256, "an integer in [1, 256]"),
    "virtual-clients": _Rule(
        int,
        lambda v: 0 <= v <= 10_000_000,
        "an integer in [0, 10000000] (0 = each SuperNode is one client)",
    ),
    "results-dir": _Rule(str, lambda v: True, "a directory path, or '' for results/"),
    "export-compression": _choice(EXPORT_COMPRESSIONS),
    "update-compression": _choice(UPDATE_COMPRESSIONS),
    "max-update-norm": _Rule(
        float, lambda v: v >= 0, "a number >= 0 (0 = no bound on the update norm)"
    ),
    "aggregation": _choice(aggregation_names),
    "trim-fraction": _Rule(float, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "krum-byzantine": _Rule(int, lambda v: v >= 0, "an integer >= 0"),
    "resume": _Rule(
        bool, lambda v: True, "true or false (true: continue results-dir's checkpoint)"
    ),
    "audit": _choice(AUDIT_MODES),
    "audit-canaries": _Rule(
        int,
        lambda v: v == -1 or v >= 2,
        "-1 (auto: the smaller of 1000 and half the training pool) or an integer >= 2",
    ),
    "secure-aggregation": _Rule(
        bool,
        lambda v: True,
        "true or false (true: client-level DP under secure "
        "aggregation, each client adds its share of the noise)",
    ),
    "secagg-num-shares": _Rule(int, lambda v: v >= 3, "an integer >= 3"),
    "secagg-reconstruction-threshold": _Rule(
        float, lambda v: 0.5 < v <= 1, "a fraction in (0.5, 1] of secagg-num-shares"
    ),
    "secagg-min-contributors": _Rule(
        float, lambda v: 0 < v <= 1, "a fraction in (0, 1] of the round's cohort"
    ),
    "secagg-modulus-range": _Rule(
        int,
        lambda v: 2**8 <= v <= 2**32 and v & (v - 1) == 0,
        "a power of two from 2**8 to 2**32",
    ),
    "secagg-clipping-range": _Rule(
        float, lambda v: v >= 0, "a number >= 0 (0 = 4·C/√D, docs/run-keys.md)"
    ),
    "secagg-timeout": _Rule(float, lambda v: v > 0, "a number of seconds > 0"),
    # Read only by tasks whose model takes them (Task.model_keys): the text tasks.
    "lora-rank": _Rule(
        int,
        lambda v: 0 <= v <= 512,
        "an integer in [0, 512] (0 = frozen encoder, head only)",
    ),
    "lora-alpha": _Rule(float, lambda v: 0 < v <= 4096, "a number in (0, 4096]"),
    "lora-target-modules": _Rule(
        str,
        lambda v: _module_names(v) is not None,
        "comma-separated module names, e.g. 'query,value' (dotted paths allowed)",
    ),
}


def _module_names(value: str) -> tuple[str, ...] | None:
    """``"query, value"`` -> ``("query", "value")``; ``None`` if any name is malformed."""
    names = tuple(part.strip() for part in value.split(","))
    pattern = r"[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*"
    ok = names and all(re.fullmatch(pattern, name) for name in names)
    return names if ok and len(set(names)) == len(names) else None


def lora_target_modules(value: str) -> tuple[str, ...]:
    """The module names run key ``lora-target-modules`` lists (already checked)."""
    names = _module_names(value)
    if names is None:
        raise ConfigError(f"run config key 'lora-target-modules': got {value!r}")
    return names


def _coerce(key: str, value: Any) -> Any:
    """Check the TOML type of ``value`` for ``key``; ints are accepted as floats."""
    rule = RULES[key]
    if rule.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if rule.kind is int and isinstance(value, bool):
        raise ConfigError(f"run config key '{key}': must be {rule.allowed}, got {value!r}")
    if not isinstance(value, rule.kind):
        raise ConfigError(
            f"run config key '{key}': must be {rule.allowed}, "
            f"got {value!r} ({type(value).__name__})"
        )
    if rule.kind is float and not math.isfinite(value):  # TOML has inf and nan
        raise ConfigError(
            f"run config key '{key}': must be a finite number ({rule.allowed}), "
            f"got {value!r}"
        )
    return value


def renamed_key(value: Any) -> ConfigError:
    """The one-line error for the old run key ``dataset`` (now ``task``)."""
    return ConfigError(
        f"run config key 'dataset' is now 'task': set task = {value!r} (a built-in "
        "task or 'package.module:attribute', docs/tasks.md)"
    )


def check_key(key: str, value: Any) -> Any:
    """One key's value, type- and range-checked on its own (e.g. a ``--set`` item).

    Cross-key rules need the whole config; :class:`RunConfig` checks those.
    """
    if key == "dataset":
        raise renamed_key(value)
    if key not in RULES:
        raise ConfigError(
            f"unknown run config key {key!r}; allowed keys: {', '.join(sorted(RULES))}"
        )
    value = _coerce(key, value)
    if not RULES[key].check(value):
        raise ConfigError(
            f"run config key '{key}': must be {RULES[key].allowed}, got {value!r}"
        )
    return value
