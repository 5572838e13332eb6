"""The aggregation rules a run can name (run key ``aggregation``), for every process.

The run config is parsed by the launchers, the clients and the server alike, so
the names a run may choose live here, in common; how each rule aggregates is the
server's (one module per rule in ``server/strategies/rules/``, bound to these names
by ``server/strategies/rules/registry.py``, which refuses a name not registered
here). A new rule is one server module, one :func:`register_aggregation_rule` and
one ``register_rule``.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.registry import Registry


@dataclass(frozen=True)
class AggregationRule:
    """A rule as the run config sees it: its name, and whether it is the mean."""

    name: str
    # The weighted mean is the only rule client-level DP accounts for (it noises the
    # mean of clipped updates); RunConfig refuses the others with privacy-mode client.
    mean: bool = False

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"an aggregation rule's name is lower-case, got {self.name!r}")


AGGREGATION_RULES: Registry[AggregationRule] = Registry(
    "aggregation",
    {
        "fedavg": AggregationRule("fedavg", mean=True),
        "median": AggregationRule("median"),
        "trimmed-mean": AggregationRule("trimmed-mean"),
        "krum": AggregationRule("krum"),
    },
)


def aggregation_names() -> tuple[str, ...]:
    """The values of run key ``aggregation``."""
    return AGGREGATION_RULES.names()


def register_aggregation_rule(rule: AggregationRule, *, replace: bool = False) -> None:
    """Make ``rule`` selectable in a run config (the server must also build it)."""
    AGGREGATION_RULES.register(rule.name, rule, replace=replace)
