"""Typed, validated run configuration parsed from Flower's ``run_config``.

Every key a run can vary lives in ``[tool.flwr.app.config]`` of ``pyproject.toml``.
:func:`RunConfig.from_run_config` parses it once; a bad value fails before round 1
with a :class:`ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from common.aggregation_rules import AGGREGATION_RULES, aggregation_names
from common.errors import ConfigError
from common.privacy.accountants.registry import accountant_names
from common.privacy.modes import PrivacyMode, mode_of, privacy_mode_names
from common.tasks.registry import get_task, is_task_reference, task_names

if TYPE_CHECKING:
    from common.tasks.task import Task

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


@dataclass(frozen=True)
class RunConfig:
    """Everything a run can vary; defaults mirror ``pyproject.toml``."""

    task: str = "digits"
    data_dir: str = ""
    num_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    node_wait_timeout: float = 300.0
    round_timeout: float = 3600.0
    features: str = "pixels"
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    local_test_fraction: float = 0.0
    seed: int = 42
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1.0
    momentum: float = 0.0
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    privacy_mode: str = "sample"
    max_grad_norm: float = 1.0
    client_sampling_rate: float = 0.5
    clipping: str = "fixed"
    client_clip_norm: float = 1.0
    target_clip_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float = 0.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    epsilon_budget: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    grad_sample_mode: str = "direct"
    reproducible_noise: bool = False
    torch_threads: int = 1
    virtual_clients: int = 0  # simulation only: client/virtual_clients.py
    results_dir: str = ""
    export_compression: str = "int8"
    update_compression: str = "int4"
    max_update_norm: float = 1000.0
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    krum_byzantine: int = 1
    resume: bool = False
    audit: str = "off"
    audit_canaries: int = -1  # auto: common/audit/canaries.py
    secure_aggregation: bool = False
    secagg_num_shares: int = 15
    secagg_reconstruction_threshold: float = 0.6
    secagg_min_contributors: float = 0.9
    secagg_modulus_range: int = 65536
    secagg_clipping_range: float = 0.0
    secagg_timeout: float = 300.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: str = "query,value"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            key = field.name.replace("_", "-")
            value = _coerce(key, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
            rule = RULES[key]
            if not rule.check(value):
                raise ConfigError(
                    f"run config key '{key}': must be {rule.allowed}, got {value!r}"
                )
        self._check_privacy_keys()
        if self.min_train_nodes > self.min_available_nodes:
            raise ConfigError(
                "run config key 'min-train-nodes': must be <= min-available-nodes "
                f"({self.min_available_nodes}), got {self.min_train_nodes}"
            )
        if self.local_test_fraction == 0 and self.fraction_evaluate > 0:
            raise ConfigError(
                "run config keys 'fraction-evaluate' and 'local-test-fraction': "
                "federated evaluation needs a local test split; set "
                "fraction-evaluate=0 or local-test-fraction > 0"
            )
        task = get_task(self.task)  # a bad module:attribute fails here, by name
        if self.features not in task.features:  # only 28x28 tasks take 'scattering'
            takers = [n for n in task_names() if self.features in get_task(n).features]
            raise ConfigError(
                f"run config keys 'features' and 'task': {self.features!r} needs "
                f"28x28 images ({' or '.join(takers)}), got task {self.task!r}"
            )
        self._check_task_paths(task)
        if self.is_client_level and not AGGREGATION_RULES.get(self.aggregation).mean:
            # The client-level accountant assumes the noised mean of clipped updates.
            # Secure aggregation (a later issue) will refuse robust rules as well: the
            # server sees only the sum, so there is nothing to take a median of.
            raise ConfigError(
                "run config keys 'aggregation' and 'privacy-mode': client-level DP "
                "accounts for the noised mean of clipped updates, so it needs "
                f"aggregation='fedavg', got aggregation={self.aggregation!r} with "
                "privacy-mode='client' (robust rules are allowed with 'sample' and "
                "'none')"
            )
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.classes_per_client > task.num_classes:
            raise ConfigError(
                f"run config key 'classes-per-client': must be <= {task.num_classes} "
                f"(the number of classes), got {self.classes_per_client}"
            )

    def _check_task_paths(self, task: Task) -> None:
        """The gradient path and partitioning the task's model and records allow."""
        if self.is_private and self.grad_sample_mode not in task.grad_sample_modes:
            raise ConfigError(
                f"run config keys 'grad-sample-mode' and 'task': task {task.name!r} "
                f"supports {', '.join(map(repr, task.grad_sample_modes))}, got "
                f"{self.grad_sample_mode!r}"
            )
        if self.partitioner == "sites" and not task.natural_sites:
            raise ConfigError(
                f"run config keys 'partitioner' and 'task': 'sites' needs a task whose "
                f"records carry a natural site; task {task.name!r} has none (use "
                "'iid', 'dirichlet', 'inner-dirichlet' or 'pathological')"
            )

    def _check_privacy_keys(self) -> None:
        if self.privacy_unit is None:
            return
        # δ < 1/n and the adaptive noise split need n: common/privacy/client_level_plan.py
        if self.is_private and self.batch_size < 2:
            # B = 1 makes Opacus' expected batch int(N·(1/N)) round to 0 for many N.
            raise ConfigError(
                "run config key 'batch-size': must be >= 2 with privacy-mode='sample' "
                f"(the expected Poisson batch of B = 1 rounds to 0), got {self.batch_size}"
            )
        if self.target_epsilon > 0 and self.noise_multiplier > 0:
            raise ConfigError(
                "run config keys 'target-epsilon' and 'noise-multiplier': set exactly "
                "one of them (> 0) and leave the other at 0, got "
                f"target-epsilon={self.target_epsilon}, "
                f"noise-multiplier={self.noise_multiplier}"
            )
        if self.target_epsilon == 0 and self.noise_multiplier == 0:
            raise ConfigError(
                "run config keys 'target-epsilon' and 'noise-multiplier': with "
                f"privacy-mode={self.privacy_mode!r} one of them must be > 0 "
                "(use privacy-mode='none' for a non-private run)"
            )

    def _check_secure_aggregation(self) -> None:
        """Distributed DP needs the client-level mechanism it distributes, nothing else."""
        conflicts = {
            "privacy-mode": (self.privacy_mode != "client", "'client'"),
            "clipping": (self.clipping != "fixed", "'fixed' (the clipped count would need "
                         "a secure sum of its own)"),
            "accountant": (self.accountant != "rdp", "'rdp' (the Skellam mechanism is "
                           "accounted with RDP)"),
            "reproducible-noise": (self.reproducible_noise, "false (the clients' noise "
                                   "must come from OS entropy)"),
            "audit": (self.audit != "off", "'off' (canary clients are not supported "
                      "with secure aggregation)"),
        }  # fmt: skip
        for key, (bad, needed) in conflicts.items():
            if bad:
                raise ConfigError(
                    f"run config keys 'secure-aggregation' and '{key}': secure "
                    f"aggregation needs {key} = {needed}, got "
                    f"{getattr(self, key.replace('-', '_'))!r}"
                )

    @property
    def privacy(self) -> PrivacyMode:
        """The run's privacy mode (``privacy-mode``, or a variant such as secure
        aggregation): its unit, description and noise (common/privacy/modes.py)."""
        return mode_of(self)

    @property
    def is_private(self) -> bool:
        """True when clients train with sample-level DP-SGD."""
        return self.privacy_unit == "record"

    @property
    def is_client_level(self) -> bool:
        """True when the run is client-level DP-FedAvg (central or distributed noise)."""
        return self.privacy_unit == "client"

    @property
    def privacy_unit(self) -> str | None:
        """What one ε protects: a record, a client, or nothing (non-private)."""
        return self.privacy.unit

    @property
    def effective_epsilon_budget(self) -> float:
        """Per-client cap on cumulative ε; ``inf`` when nothing caps it."""
        if self.epsilon_budget > 0:
            return self.epsilon_budget
        if self.target_epsilon > 0:
            return self.target_epsilon
        return float("inf")

    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's ``context.run_config``; unknown keys are an error."""
        if "dataset" in raw:
            raise renamed_key(raw["dataset"])
        unknown = sorted(set(raw) - set(RULES))
        if unknown:
            raise ConfigError(
                f"unknown run config key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(sorted(RULES))}"
            )
        kwargs = {key.replace("-", "_"): value for key, value in raw.items()}
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The config as run-config keys (dashes), e.g. for ``config.json``."""
        return {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in dataclasses.fields(self)
        }


def run_config_of(raw: Mapping[str, Any]) -> RunConfig:
    """:meth:`RunConfig.from_run_config`, parsed once per distinct config in this
    process: a SuperNode hosting virtual clients reads the same run config for each of
    its clients (1,000 a round), and a parse costs about ten times the lookup. A
    ``RunConfig`` is frozen, so every caller can share one."""
    key = tuple(sorted(raw.items()))
    try:
        return _parsed(key)
    except TypeError:  # an unhashable value (never from Flower): parsed, not kept
        return RunConfig.from_run_config(raw)


@lru_cache(maxsize=16)
def _parsed(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_run_config(dict(items))


def renamed_key(value: Any) -> ConfigError:
    """The one-line error for the old run key ``dataset`` (now ``task``)."""
    return ConfigError(
        f"run config key 'dataset' is now 'task': set task = {value!r} (a built-in "
        "task or 'package.module:attribute', docs/tasks.md)"
    )


def noise_statement(cfg: RunConfig) -> str:
    """Where the DP noise comes from, as the results and the log state it."""
    return cfg.privacy.noise_statement(cfg.reproducible_noise)


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
