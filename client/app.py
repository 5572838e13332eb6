"""The ClientApp: local DP-SGD training with a cumulative privacy ledger, and evaluation."""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dp_training import train_non_private, train_private
from client.ledger_store import load_ledger, store_ledger
from client.local_data import ClientShard, load_client_shard
from client.node_settings import NodeSettings
from client.round_privacy import RoundDecision, decide_round
from common.config import RunConfig
from common.metrics import evaluate_model
from common.models import build_model
from common.privacy_ledger import LedgerError, PrivacyLedger
from common.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    NO_ACCOUNTANT,
    PRIVACY_KEY,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_LEDGER_ERROR,
    STATUS_TRAINED,
)

log = logging.getLogger("privfed.client")
app = ClientApp()


def _setup(context: Context) -> tuple[RunConfig, NodeSettings, ClientShard]:
    cfg = RunConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(dict(context.node_config))
    torch.set_num_threads(cfg.torch_threads)
    return cfg, node, load_client_shard(cfg, node)


def _model_from(msg: Message, cfg: RunConfig, shard: ClientShard) -> torch.nn.Module:
    model = build_model(cfg.dataset, shard.num_classes, features=cfg.features)
    model.load_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict())
    return model


def _privacy_metrics(
    shard: ClientShard, ledger: PrivacyLedger, decision: RoundDecision, epsilon: float
) -> dict[str, float | int]:
    return {
        "partition-id": shard.partition_id,
        "epsilon": epsilon,
        "epsilon-budget": decision.budget,
        "delta": ledger.delta,
        "noise-multiplier": decision.noise_multiplier,
        "sample-rate": decision.plan.sample_rate,
        "steps-total": ledger.total_steps,
        "rounds-trained": len(ledger.rounds),
    }


def _refusal(
    msg: Message, shard: ClientShard, ledger: PrivacyLedger, decision: RoundDecision
) -> Message:
    log.warning(
        "partition %d: budget exhausted (ε %.3f now, %.3f after this round > %.3f)",
        shard.partition_id,
        decision.epsilon_before,
        decision.epsilon_after,
        decision.budget,
    )
    metrics = {
        "num-examples": 0,
        "steps-round": 0,
        "epsilon-would-be": decision.epsilon_after,
        **_privacy_metrics(shard, ledger, decision, decision.epsilon_before),
    }
    privacy = {
        "status": STATUS_BUDGET_EXHAUSTED,
        "accountant": ledger.accountant_name,
        "ledger": ledger.to_json(),
    }
    return Message(
        RecordDict(
            {METRICS_KEY: MetricRecord(metrics), PRIVACY_KEY: ConfigRecord(privacy)}
        ),
        reply_to=msg,
    )


def _ledger_failure(msg: Message, shard: ClientShard, error: LedgerError) -> Message:
    """Fail closed: no training, no update, and the reason for the server to record."""
    log.error("partition %d refuses to train: %s", shard.partition_id, error)
    metrics = {"num-examples": 0, "partition-id": shard.partition_id}
    privacy = {"status": STATUS_LEDGER_ERROR, "error": str(error)}
    return Message(
        RecordDict(
            {METRICS_KEY: MetricRecord(metrics), PRIVACY_KEY: ConfigRecord(privacy)}
        ),
        reply_to=msg,
    )


def _round_seed(cfg: RunConfig, shard: ClientShard, server_round: int) -> int:
    return (cfg.seed * 1_000_003 + shard.partition_id * 7919 + server_round) % 2**63


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round, unless it would take this client past its ε budget."""
    started = time.perf_counter()
    cfg, node, shard = _setup(context)
    server_round = int(msg.content["config"]["server-round"])
    model = _model_from(msg, cfg, shard)
    torch.manual_seed(_round_seed(cfg, shard, server_round))
    if not cfg.is_private:
        outcome = train_non_private(model, shard.x_train, shard.y_train, cfg)
        metrics = {
            "num-examples": len(shard.x_train),
            "train-loss": outcome.mean_loss,
            "partition-id": shard.partition_id,
        }
        privacy = {"status": STATUS_TRAINED, "accountant": NO_ACCOUNTANT}
        return _reply(msg, model, metrics, privacy, started)

    try:
        ledger = load_ledger(context, cfg, node)
    except LedgerError as exc:
        return _ledger_failure(msg, shard, exc)
    decision = decide_round(cfg, len(shard.x_train), ledger)
    if not decision.allowed:
        return _refusal(msg, shard, ledger, decision)

    outcome = train_private(
        model, shard.x_train, shard.y_train, cfg, decision.plan, decision.noise_multiplier
    )
    ledger = ledger.extended(
        server_round,
        decision.noise_multiplier,
        decision.plan.sample_rate,
        decision.plan.steps,
        run_id=int(context.run_id),
    )
    store_ledger(context, ledger, node)  # persisted before the update leaves the client
    epsilon = ledger.epsilon()
    # No training loss: it is a statistic of the private records that DP-SGD's noise
    # does not cover. The client logs it locally instead.
    log.info("partition %d: round %d train loss %.4f (not sent)", shard.partition_id,
             server_round, outcome.mean_loss)  # fmt: skip
    metrics = {
        "num-examples": len(shard.x_train),
        "steps-round": decision.plan.steps,
        **_privacy_metrics(shard, ledger, decision, epsilon),
    }
    privacy = {
        "status": STATUS_TRAINED,
        "accountant": ledger.accountant_name,
        "ledger": ledger.to_json(),
    }
    return _reply(msg, model, metrics, privacy, started)


def _reply(
    msg: Message,
    model: torch.nn.Module,
    metrics: dict[str, float | int],
    privacy: dict[str, str],
    started: float,
) -> Message:
    metrics = {**metrics, "client-seconds": time.perf_counter() - started}
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(model.state_dict()),
            METRICS_KEY: MetricRecord(metrics),
            PRIVACY_KEY: ConfigRecord(privacy),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss, accuracy and macro precision/recall/F1 on the local held-out split."""
    cfg, _, shard = _setup(context)
    if len(shard.x_test) == 0:
        raise ValueError(
            f"partition {shard.partition_id} has no local test split "
            f"(local-test-fraction={cfg.local_test_fraction}); nothing to evaluate"
        )
    model = _model_from(msg, cfg, shard)
    scores = evaluate_model(model, shard.x_test, shard.y_test, shard.num_classes)
    metrics: dict[str, float | int] = {"num-examples": len(shard.x_test)}
    metrics.update({f"eval-{k}": v for k, v in scores.items()})
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
