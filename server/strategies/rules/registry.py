"""The server's aggregation rules, bound by name to common's list of rule names.

The names (what a run config accepts) are :mod:`common.aggregation_rules`'s, so
that every process can check them; this table holds how the server builds each,
one module per rule. A name common does not know cannot be bound here, and a test
checks that every name common lists is bound. :func:`make_rule` is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg

from common.aggregation_rules import AGGREGATION_RULES
from common.config import RunConfig
from common.registry import Registry
from server.strategies.rules import fedavg, krum, median, trimmed_mean

# A rule's builder: Flower's strategy whose aggregate replaces the mean, or None
# for the mean itself (PrivateFedAvg's own).
RuleBuilder = Callable[[RunConfig], FedAvg | None]

RULE_BUILDERS: Registry[RuleBuilder] = Registry("aggregation")


def register_rule(name: str, build: RuleBuilder, *, replace: bool = False) -> None:
    """Bind ``build`` to ``name``, which common must list (else the run key's error)."""
    AGGREGATION_RULES.get(name)
    RULE_BUILDERS.register(name, build, replace=replace)


for _name, _module in (
    ("fedavg", fedavg),
    ("median", median),
    ("trimmed-mean", trimmed_mean),
    ("krum", krum),
):
    register_rule(_name, _module.build)


def make_rule(cfg: RunConfig) -> FedAvg | None:
    """Flower's strategy for ``cfg.aggregation``; ``None`` for ``fedavg`` (the mean).

    The strategy that uses it sets the rule's weight key and metrics function to
    its own (:class:`server.strategies.private_fedavg.PrivateFedAvg`).
    """
    return RULE_BUILDERS.get(cfg.aggregation)(cfg)
