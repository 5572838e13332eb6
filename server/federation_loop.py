"""The round loop: wait for nodes, train, evaluate, record, checkpoint, stop cleanly."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common.config import RunConfig
from common.wire.reply_fields import Status
from server.messaging import CountingGrid, exchange, round_bytes
from server.results.checkpoint import Checkpoint, Checkpointer, restore_strategy
from server.results.client_outcomes import ClientOutcome
from server.results.dropouts import dropouts, dropouts_text
from server.results.epsilon_text import epsilon_text
from server.results.run_folder import ResultsWriter
from server.strategies.private_fedavg import PrivateFedAvg

CLIENT_LEVEL_FAILED_ROUNDS = 3  # see run_rounds


class NodesUnavailable(RuntimeError):
    """Fewer nodes than required connected before the timeout."""


class RoundFailed(RuntimeError):
    """No client trained or refused in a round: every reply failed or was rejected, or
    none came."""


UNUSABLE = ("failed", "rejected")  # Status.counter values of replies that give nothing


def check_round(server_round: int, outcomes: list[ClientOutcome], sent: int) -> None:
    """Raise :class:`RoundFailed` when a round produced nothing but failures and
    rejected updates.

    A round that instructed nobody (an empty Poisson cohort, client-level DP) is
    valid: it adds noise only.
    """
    if sent == 0 or any(o.status.counter not in UNUSABLE for o in outcomes):
        return
    if not outcomes:
        raise RoundFailed(f"round {server_round}: no client replied in time")
    first = outcomes[0].reason or "unknown error"
    rejected = sum(o.status is Status.REJECTED for o in outcomes)
    if rejected == 0:
        what = f"all {len(outcomes)} clients failed; first error"
    elif rejected == len(outcomes):
        what = f"all {len(outcomes)} updates were rejected; first reason"
    else:
        failed = len(outcomes) - rejected
        what = f"no usable update ({failed} failed, {rejected} rejected); first reason"
    raise RoundFailed(f"round {server_round}: {what}: {first[-1500:]}")


def wait_for_nodes(grid: Grid, required: int, timeout: float, poll: float = 0.1) -> int:
    """Block until ``required`` nodes are connected (the start-up race)."""
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= required:
            return connected
        now = time.monotonic()
        if now >= deadline:
            raise NodesUnavailable(
                f"only {connected} of {required} nodes connected after {timeout:.0f} s "
                "(run config keys 'min-available-nodes', 'node-wait-timeout')"
            )
        if now - last_log >= 5:
            log(INFO, "Waiting for nodes: %d of %d connected", connected, required)
            last_log = now
        time.sleep(poll)


@dataclass
class LoopState:
    """What the loop has learned so far about every client."""

    latest: dict[int, ClientOutcome] = field(default_factory=dict)  # by node id
    refusals: int = 0  # budget-exhausted replies
    policy_refusals: int = 0
    failures: int = 0
    rejections: int = 0  # replies the server refused (server/checks/update_validation.py)

    def record(self, outcomes: list[ClientOutcome]) -> None:
        """Remember each node's latest outcome (failures and rejected replies keep the
        older privacy facts: a rejected reply's ledger is not trusted)."""
        for outcome in outcomes:
            if outcome.status.counter == "failed":
                self.failures += 1
                continue
            if outcome.status.counter == "rejected":
                self.rejections += 1
                continue
            if outcome.status is Status.BUDGET_EXHAUSTED:
                self.refusals += 1
            if outcome.status is Status.POLICY_REFUSED:
                self.policy_refusals += 1
            previous = self.latest.get(outcome.node_id)
            if outcome.ledger is None and previous is not None:
                # A refusal without a ledger keeps the privacy facts seen before.
                outcome = dataclasses.replace(outcome, ledger=previous.ledger)
            self.latest[outcome.node_id] = outcome

    def most_spent(self) -> ClientOutcome | None:
        """The outcome whose released ledger has the largest ε (∞ included)."""
        released = [o for o in self.latest.values() if o.epsilon is not None]
        return max(released, key=lambda o: o.epsilon or 0.0) if released else None

    def max_epsilon(self) -> float | None:
        """Max cumulative ε over every released ledger seen so far (∞ possible)."""
        top = self.most_spent()
        return top.epsilon if top is not None else None

    def unreleased(self) -> int:
        """Nodes whose trained or budget reply came without a ledger (their policy)."""
        with_ledger_status = (Status.TRAINED, Status.BUDGET_EXHAUSTED)
        return sum(
            1
            for o in self.latest.values()
            if o.ledger is None and o.status in with_ledger_status
        )

    def all_exhausted(self, node_ids: list[int]) -> bool:
        """True when every connected node has refused (budget or policy)."""
        return bool(node_ids) and all(
            n in self.latest and self.latest[n].status.refused for n in node_ids
        )


@dataclass(frozen=True)
class LoopResult:
    """How the loop ended."""

    arrays: ArrayRecord
    rounds_completed: int
    stop_reason: str
    state: LoopState
    timings: dict[str, float]
    orchestration_per_round: list[float]
    last_record: dict[str, Any] | None = None
    budget_stop: bool = False  # the server stopped before passing a federation budget


def _client_seconds(outcomes: list[ClientOutcome]) -> list[float]:
    return [o.client_seconds for o in outcomes if o.client_seconds is not None]


def run_rounds(
    grid: Grid,
    cfg: RunConfig,
    strategy: PrivateFedAvg,
    arrays: ArrayRecord,
    central_eval: Callable[[ArrayRecord], dict[str, float]],
    writer: ResultsWriter,
    app_started: float,
    checkpoint: Checkpointer | None = None,
    resume: Checkpoint | None = None,
) -> LoopResult:
    """Run up to ``num-rounds`` rounds; write a JSON line and checkpoint each round.

    ``app_started`` is the ``time.monotonic()`` at which the ServerApp started.
    ``checkpoint`` is called after each round, before the round is announced;
    ``resume`` continues after its round with its strategy state.
    """
    wait_started = time.monotonic()
    connected = wait_for_nodes(grid, cfg.min_available_nodes, cfg.node_wait_timeout)
    log(INFO, "%d nodes connected; starting %d rounds", connected, cfg.num_rounds)
    strategy.start_run(list(grid.get_node_ids()))
    if resume is not None:
        restore_strategy(strategy, resume)
    totals = {
        "startup_to_round_1": time.monotonic() - app_started,
        "wait_for_nodes": time.monotonic() - wait_started,
    }

    state = LoopState()
    failed_rounds = 0  # rounds in a row in which every instructed client failed
    stop_reason = f"completed all {cfg.num_rounds} rounds"
    stopped_on_budget = False
    completed = resume.round if resume is not None else 0
    orchestration: list[float] = []
    for server_round in range(completed + 1, cfg.num_rounds + 1):
        budget_stop = strategy.budget_stop(server_round)
        if budget_stop is not None:
            stopped_on_budget = True
            stop_reason = f"{budget_stop}; stopped after round {completed}"
            log(INFO, "Stopping: %s", stop_reason)
            break
        t = {"start": time.monotonic()}
        started_at = time.time()  # wall clock, comparable with the launching script
        counted = CountingGrid(grid)  # every message's bytes, per node
        step = strategy.train_round(server_round, arrays, counted, cfg.round_timeout)
        t["replies"] = t["start"] + step.exchange_seconds
        t["aggregated"] = time.monotonic()
        outcomes = strategy.last_outcomes
        state.record(outcomes)
        all_failed = bool(step.sent) and all(o.status.counter in UNUSABLE for o in outcomes)
        failed_rounds = failed_rounds + 1 if all_failed else 0
        # A client-level round is ledgered and noised whoever fails (one bad client
        # in a cohort of one must not end the run); it fails on a run of such rounds.
        if not cfg.is_client_level or failed_rounds >= CLIENT_LEVEL_FAILED_ROUNDS:
            check_round(server_round, outcomes, step.sent)
        train_metrics = step.metrics
        if step.arrays is not None:
            arrays = step.arrays

        fed_metrics = None
        eval_counted = None
        if cfg.fraction_evaluate > 0:
            eval_counted = CountingGrid(grid)
            eval_replies = exchange(
                eval_counted,
                strategy.configure_evaluate(
                    server_round, arrays, ConfigRecord(), eval_counted
                ),
                cfg.round_timeout,
            )
            aggregated = strategy.aggregate_evaluate(server_round, eval_replies)
            fed_metrics = dict(aggregated) if aggregated is not None else None
        t["federated"] = time.monotonic()
        central = central_eval(arrays)
        t["central"] = time.monotonic()

        record = _round_record(server_round, cfg, outcomes, state, central, fed_metrics)
        record.update(strategy.round_privacy())
        partitions = {n: o.partition_id for n, o in state.latest.items()}
        record["dropped"] = dropouts(
            counted.down, outcomes, partitions, counted.unavailable
        )
        record["message_bytes"] = round_bytes(update_encoding(cfg), counted, eval_counted)
        record["train_loss"] = (
            float(train_metrics["train-loss"])
            if train_metrics is not None and "train-loss" in train_metrics
            else None
        )
        writer.save_model(arrays)
        t["end"] = time.monotonic()
        compute = _client_seconds(outcomes)
        timing = {
            "train_exchange": t["replies"] - t["start"],
            "client_compute_max": max(compute, default=0.0),
            "client_compute_sum": sum(compute),
            "aggregation": t["aggregated"] - t["replies"],
            "federated_evaluation": t["federated"] - t["aggregated"],
            "central_evaluation": t["central"] - t["federated"],
            "record_and_checkpoint": t["end"] - t["central"],
        }
        # Everything in the round except the slowest client's own work and central
        # evaluation: messaging, scheduling, waiting, aggregation, bookkeeping.
        timing["orchestration"] = (
            t["end"]
            - t["start"]
            - timing["client_compute_max"]
            - timing["central_evaluation"]
        )
        orchestration.append(timing["orchestration"])
        record["timing_seconds"] = {k: round(v, 4) for k, v in timing.items()}
        record["seconds"] = round(t["end"] - t["start"], 4)
        record["started_at"] = started_at
        if checkpoint is not None:  # before the round is announced
            checkpoint(server_round, arrays, record, time.monotonic())
            totals["checkpoint"] = totals.get("checkpoint", 0.0) + (
                time.monotonic() - t["end"]
            )
        writer.append_round(record)
        for key, value in timing.items():
            totals[key] = totals.get(key, 0.0) + value
        completed = server_round
        _log_progress(record, cfg)

        node_ids = list(grid.get_node_ids())
        if state.all_exhausted(node_ids):
            why = sorted({state.latest[n].status.value for n in node_ids})
            stop_reason = (
                f"every client refused to train ({', '.join(why)}; "
                f"stopped after round {server_round} of {cfg.num_rounds})"
            )
            log(INFO, "Stopping: %s", stop_reason)
            break
    last = writer.rounds[-1] if writer.rounds else None
    return LoopResult(
        arrays, completed, stop_reason, state, totals, orchestration, last,
        budget_stop=stopped_on_budget,
    )  # fmt: skip


def update_encoding(cfg: RunConfig) -> str:
    """How a round's updates travel: ``update-compression``, or ``masked`` (secure
    aggregation's own quantised, masked vectors)."""
    return "masked" if cfg.secure_aggregation else cfg.update_compression


def _round_record(
    server_round: int,
    cfg: RunConfig,
    outcomes: list[ClientOutcome],
    state: LoopState,
    central: dict[str, float],
    fed_metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    counts = {"trained": 0, "refused": 0, "failed": 0, "rejected": 0}
    for o in outcomes:
        counts[o.status.counter] += 1
    top = state.most_spent()
    ledger = top.ledger if top is not None else None
    eps = state.max_epsilon()
    private = cfg.is_private
    return {
        "round": server_round,
        "central": central,
        "federated_evaluation": fed_metrics,
        "clients": sorted(
            (o.to_dict() for o in outcomes),
            key=lambda d: (d["partition_id"] is None, d["partition_id"] or 0, d["node_id"]),
        ),
        **{f"clients_{k}": v for k, v in counts.items()},
        # ε, accountant and δ all come from the one ledger with the largest ε.
        "max_epsilon": eps if eps is not None and math.isfinite(eps) else None,
        "max_epsilon_infinite": eps == math.inf,
        "accountant": (ledger.accountant_name if ledger else None) if private else "none",
        "delta": (ledger.delta if ledger else None) if private else None,
        "privacy_unit": cfg.privacy_unit if private else None,
        "nodes_keeping_ledger_private": state.unreleased() if private else None,
        "privacy_mode": cfg.privacy_mode,
    }


def _log_progress(record: dict[str, Any], cfg: RunConfig) -> None:
    eps_text = epsilon_text(record)
    log(
        INFO,
        "[privfed] round %d/%d | accuracy %.4f | %s | trained %d, refused %d, "
        "failed %d, rejected %d | %.1f s%s",
        record["round"],
        cfg.num_rounds,
        record["central"]["accuracy"],
        eps_text,
        record["clients_trained"],
        record["clients_refused"],
        record["clients_failed"],
        record["clients_rejected"],
        record["seconds"],
        dropouts_text(record.get("dropped") or []),
    )
