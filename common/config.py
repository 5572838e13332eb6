"""Typed, validated run configuration parsed from Flower's ``run_config``.

Every key a run can vary lives in ``[tool.flwr.app.config]`` of ``pyproject.toml``;
what each key accepts on its own is in :mod:`common.run_keys`.
:func:`RunConfig.from_run_config` parses it once and adds the rules that span keys; a
bad value fails before round 1 with a :class:`ConfigError` that names the key and
what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from common.aggregation_rules import AGGREGATION_RULES
from common.errors import ConfigError
from common.privacy.modes import PrivacyMode, mode_of
from common.run_keys import RULES, check_key, renamed_key
from common.tasks.registry import get_task, task_names

if TYPE_CHECKING:
    from common.tasks.task import Task


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
            object.__setattr__(self, field.name, check_key(key, getattr(self, field.name)))
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


def noise_statement(cfg: RunConfig) -> str:
    """Where the DP noise comes from, as the results and the log state it."""
    return cfg.privacy.noise_statement(cfg.reproducible_noise)
