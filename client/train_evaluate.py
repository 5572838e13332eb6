"""Training and evaluation: local DP-SGD under the node's privacy policy, with a
cumulative ledger, and a simulated SuperNode's group of virtual clients.

:mod:`client.app` registers these handlers and imports this module (and torch) the
first time a message needs it. What a reply may carry is declared in
:mod:`common.wire.reply`; this module only chooses the constructor. Nothing here
seeds DP randomness from the run config or a message (see
:mod:`common.privacy.randomness`).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message

from client.data.local_data import ClientShard, load_client_shard
from client.failure_replies import (
    data_refusal,
    deployed,
    evaluate_failed,
    sanitised,
    train_failed,
)
from client.node_settings import NodeSettings
from client.privacy.ledger_store import (
    ledger_lock,
    load_ledger,
    public_reason,
    reported_fingerprint,
    store_ledger,
    witnessed_in,
)
from client.privacy.policy import (
    MIN_TEST_RECORDS,
    PolicyError,
    PrivacyPolicy,
    load_policy,
)
from client.privacy.resent_reply import request_digest, store_reply, stored_reply
from client.training.dp_training import train_non_private, train_private
from client.training.vectorised import take_change
from client.virtual_clients import group_handler
from common.audit.gradient_canaries import gradient_canaries, white_box_applies
from common.config import RunConfig, run_config_of
from common.data.checks import DatasetError
from common.ledger.privacy_ledger import LedgerError, PrivacyLedger
from common.privacy.randomness import integer_generator, reproducible_seed, round_generator
from common.privacy.round_decision import decide_round
from common.privacy.update_clipping import ClippedUpdate, clip_update
from common.tasks.models import build_run_model
from common.tasks.scoring import evaluate_task
from common.wire.reply import EvaluateReport, TrainReport
from common.wire.reply_fields import ARRAYS_KEY, CLIP_NORM_KEY
from common.wire.update_codec import UpdateCodec, encode_change

log = logging.getLogger("privfed.client")


def _setup(context: Context) -> tuple[RunConfig, NodeSettings, ClientShard]:
    cfg = run_config_of(context.run_config)
    node = NodeSettings.from_node_config(dict(context.node_config))
    node = node.in_results(cfg.results_dir)  # a simulated ledger outlives the run
    torch.set_num_threads(cfg.torch_threads)
    return cfg, node, load_client_shard(cfg, node)


def _model_from(msg: Message, cfg: RunConfig, shard: ClientShard) -> torch.nn.Module:
    model = build_run_model(cfg, shard.num_classes)
    model.load_state_dict(msg.content[ARRAYS_KEY].to_torch_state_dict())
    return model


def _replay(cfg: RunConfig, partition_id: int, server_round: int) -> int | None:
    """The public seed of every draw this round under ``reproducible-noise``, else
    ``None`` (OS entropy; see :mod:`common.privacy.randomness`)."""
    if not cfg.reproducible_noise:
        return None
    return reproducible_seed(cfg.seed, partition_id, server_round)


def _send(
    msg: Message,
    report: TrainReport,
    model: torch.nn.Module | None = None,
    compression: str = "none",
    replay: int | None = None,
) -> Message:
    """The reply; trained weights go as float32, or as their change from the global
    model encoded by ``update-compression`` (after the DP noise: post-processing),
    rounded from OS entropy, or from ``replay`` under ``reproducible-noise``."""
    arrays = None
    if model is not None and compression != "none":
        sent = msg.content[ARRAYS_KEY]  # the server decodes against it, in its order
        state = model.state_dict()
        after = [state[key].detach().numpy() for key in sent.keys()]
        arrays = encode_change(
            compression, after, sent.to_numpy_ndarrays(), integer_generator(replay)
        )
        report = report.with_compressed_update()
    elif model is not None:
        arrays = ArrayRecord(model.state_dict())
    return Message(report.to_content(arrays), reply_to=msg)


def _refuse(msg: Message, shard: ClientShard, reason: str, detail: str = "") -> Message:
    log.warning("partition %d refuses to train: %s", shard.partition_id, detail or reason)
    return _send(msg, TrainReport.policy_refused(shard.partition_id, reason))


def _train(msg: Message, context: Context) -> Message:
    """Train one round, unless the node's policy or its ε budget forbids it."""
    started = time.perf_counter()
    try:
        cfg, node, shard = _setup(context)
    except DatasetError as exc:
        return data_refusal(msg, context, exc, TrainReport.data_error)
    pid = shard.partition_id
    server_round = int(msg.content["config"]["server-round"])
    try:
        policy = load_policy(cfg, node.state_dir)
    except PolicyError as exc:
        return _refuse(msg, shard, str(exc))
    refusal = policy.refusal_for_run(cfg)
    if refusal is None and cfg.audit != "off" and deployed(context):
        refusal = (
            f"run config key 'audit': {cfg.audit!r} plants canaries, which only a "
            "simulation may do; a deployed node trains only with audit = 'off'"
        )
    if refusal is not None:
        return _refuse(msg, shard, refusal)
    with ledger_lock(node):  # read, decide, train and store without a second round
        try:
            witnessed = witnessed_in(msg.content["config"])
            ledger = load_ledger(context, node, cfg.accountant, policy.delta, witnessed)
        except LedgerError as exc:  # fail closed: never "nothing spent"
            log.error("partition %d refuses to train: %s", pid, exc)
            return _send(msg, TrainReport.ledger_error(pid, public_reason(exc)))
        if cfg.is_private:
            return _train_private(msg, context, cfg, node, shard, policy, ledger, started)
        if cfg.is_client_level:
            return _train_client_level(
                msg, context, cfg, node, shard, policy, ledger, started
            )
        # Non-private: only a policy with allow-non-private gets here; ledgered as ε = ∞.
        model = _model_from(msg, cfg, shard)
        generator = round_generator(reproducible_seed(cfg.seed, pid, server_round))
        outcome = train_non_private(model, shard.x_train, shard.y_train, cfg, generator)
        released_ledger = ledger.extended_non_private(server_round, int(context.run_id))
        store_ledger(context, released_ledger, node)
        report = TrainReport.trained_non_private(pid, len(shard.x_train), outcome.mean_loss)
        report = report.with_fingerprint(reported_fingerprint(context, node))
        replay = _replay(cfg, pid, server_round)
        return _send(msg, report, model, cfg.update_compression, replay)


def _gradient_canaries(
    cfg: RunConfig, node: NodeSettings, model: torch.nn.Module
) -> list[int]:
    """This partition's included gradient canaries in a simulated white-box audit
    (:mod:`common.audit.gradient_canaries`); none otherwise. A deployed node never
    gets here with an audit: it refused the run."""
    if not white_box_applies(cfg) or node.num_partitions is None:
        return []
    from common.tasks.models import count_parameters

    plan = gradient_canaries(
        cfg.seed, cfg.audit_canaries, count_parameters(model), node.num_partitions
    )
    return plan.included_coordinates(int(node.partition_id or 0)).tolist()


def _train_private(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    node: NodeSettings,
    shard: ClientShard,
    policy: PrivacyPolicy,
    ledger: PrivacyLedger,
    started: float,
) -> Message:
    """One DP-SGD round planned from public numbers only (see records_for_planning)."""
    pid = shard.partition_id
    server_round = int(msg.content["config"]["server-round"])
    digest = request_digest(msg, context.run_config)
    resent = stored_reply(node.ledger_dir, digest, server_round, ledger)
    if resent is not None:  # a resumed server asks again: nothing new is released
        log.info(
            "partition %d: round %d asked again with the same model and settings; "
            "re-sending the update already charged (ε %.3f unchanged)",
            pid, server_round, ledger.epsilon(),
        )  # fmt: skip
        return Message(resent, reply_to=msg)
    records = len(shard.x_train)
    planned = policy.records_for_planning(records)
    try:
        decision = decide_round(
            cfg, planned, ledger, policy.epsilon_budget, int(context.run_id)
        )
    except ValueError as exc:  # e.g. a batch size that gives an empty expected batch
        return _refuse(msg, shard, str(exc))
    round_refusal = policy.refusal_for_round(
        decision.noise_multiplier, planned, ledger, records
    )
    if round_refusal is not None:
        return _refuse(msg, shard, *round_refusal)
    if records > planned:  # the owner's to fix; nothing the server sees depends on it
        log.warning(
            "partition %d holds %d training records, more than the %d it plans from "
            "(planning-records): ε holds per record, but the δ < 1/N check is "
            "against %d and batches are larger than planned; raise planning-records",
            pid, records, planned, planned,
        )  # fmt: skip
    shown = ledger if policy.release_ledger else None
    if not decision.allowed:
        log.warning(
            "partition %d: budget exhausted (ε %.3f now, %.3f after this round > %.3f)",
            pid, decision.epsilon_before, decision.epsilon_after, decision.budget,
        )  # fmt: skip
        report = TrainReport.budget_exhausted(pid, shown)
        return _send(msg, report.with_fingerprint(reported_fingerprint(context, node)))

    model = _model_from(msg, cfg, shard)
    replay = _replay(cfg, pid, server_round)
    outcome = train_private(
        model, shard.x_train, shard.y_train, cfg, decision.plan,
        decision.noise_multiplier, round_generator(replay),
        _gradient_canaries(cfg, node, model),
    )  # fmt: skip
    ledger = ledger.extended(
        server_round,
        decision.noise_multiplier,
        decision.plan.sample_rate,
        decision.plan.steps,
        run_id=int(context.run_id),
    )
    store_ledger(context, ledger, node)  # persisted before the update leaves the client
    # The loss and N stay here: DP-SGD's noise does not cover them.
    log.info(
        "partition %d: round %d trained on %d records (planned as %d), ε %.3f (%s, "
        "δ=%g), loss %.4f (kept local)",
        pid, server_round, records, planned, ledger.epsilon(), ledger.accountant_name,
        ledger.delta, outcome.mean_loss,
    )  # fmt: skip
    seconds = time.perf_counter() - started if policy.release_timing else None
    shown = ledger if policy.release_ledger else None
    report = TrainReport.trained(pid, planned, shown, seconds)
    report = report.with_fingerprint(reported_fingerprint(context, node))
    reply = _send(msg, report, model, cfg.update_compression, replay)
    store_reply(node.ledger_dir, digest, server_round, ledger, reply.content)
    return reply


def _clipped_change(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    node: NodeSettings,
    shard: ClientShard,
    ledger: PrivacyLedger,
) -> tuple[list[str], ClippedUpdate, PrivacyLedger]:
    """DP-FedAvg's client step: train without local noise, clip the change to C.

    The client-level noise is added by the server (central) or by the clients'
    shares (secure aggregation), so the node's own (record-level) ledger records
    the round as a release without DP — stored here, before anything leaves: its
    policy allowed it (``allow-client-level`` / ``allow-secure-aggregation``), and a
    later record-level run sees ε = ∞.
    """
    server_round = int(msg.content["config"]["server-round"])
    clip_norm = msg.content["config"].get(CLIP_NORM_KEY)
    if not isinstance(clip_norm, float) or not 0 < clip_norm < math.inf:
        raise ValueError(f"instruction config {CLIP_NORM_KEY!r} must be a float > 0")
    taken = take_change(shard.partition_id, server_round)  # its group's batched run
    keys, change = taken or _trained_change(msg, cfg, shard, server_round)
    clipped = clip_update(change, clip_norm)
    ledger = ledger.extended_non_private(server_round, int(context.run_id))
    store_ledger(context, ledger, node)  # persisted before the update leaves
    return keys, clipped, ledger


def _trained_change(
    msg: Message, cfg: RunConfig, shard: ClientShard, server_round: int
) -> tuple[list[str], list[np.ndarray]]:
    """Plain local SGD from the global model; the change, for every state key."""
    model = _model_from(msg, cfg, shard)
    before = [p.detach().numpy().copy() for p in model.state_dict().values()]
    generator = round_generator(
        reproducible_seed(cfg.seed, shard.partition_id, server_round)
    )
    train_non_private(model, shard.x_train, shard.y_train, cfg, generator)
    after = model.state_dict()
    change = [v.detach().numpy() - b for v, b in zip(after.values(), before, strict=True)]
    return list(after), change


def _train_client_level(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    node: NodeSettings,
    shard: ClientShard,
    policy: PrivacyPolicy,
    ledger: PrivacyLedger,
    started: float,
) -> Message:
    """Central DP-FedAvg: the clipped change goes to a server trusted to noise it."""
    if cfg.secure_aggregation:  # never in the clear: the masked stages carry it
        return _refuse(
            msg, shard,
            "run config key 'secure-aggregation' is true: this node sends its update "
            "only masked, through the secure-aggregation stages",
        )  # fmt: skip
    keys, clipped, ledger = _clipped_change(msg, context, cfg, node, shard, ledger)
    seconds = time.perf_counter() - started if policy.release_timing else None
    shown = ledger if policy.release_ledger else None
    report = TrainReport.client_update(
        shard.partition_id, clipped.below_clip, shown, seconds
    )
    report = report.with_fingerprint(reported_fingerprint(context, node))
    if cfg.update_compression == "none":
        update = ArrayRecord(
            {k: torch.from_numpy(a) for k, a in zip(keys, clipped.arrays, strict=True)}
        )
    else:  # encoded after clipping; the server clips the decoded change again
        codec = UpdateCodec(cfg.update_compression)
        server_round = int(msg.content["config"]["server-round"])
        rounding = integer_generator(_replay(cfg, shard.partition_id, server_round))
        update = codec.encode(clipped.arrays, rounding)
        report = report.with_compressed_update()
    return Message(report.to_content(update), reply_to=msg)


train = sanitised(_train, train_failed)


# -- a simulated SuperNode hosting many clients (client/virtual_clients.py) ---------
def _each_member(msg: Message, context: Context) -> Message:
    """One virtual client's message, answered by the handler the ClientApp has for it."""
    from client.app import app  # imported by now: it is what called this module

    return app(msg, context)


train_group = group_handler(_each_member, _model_from)
evaluate_group = group_handler(_each_member)


def _evaluate(msg: Message, context: Context) -> Message:
    """Local test metrics of the global model, if the node's policy releases them."""
    try:
        cfg, node, shard = _setup(context)
    except DatasetError as exc:
        return data_refusal(msg, context, exc, EvaluateReport.data_error)
    try:
        policy = load_policy(cfg, node.state_dir)
    except PolicyError as exc:
        report = EvaluateReport.policy_refused(shard.partition_id, str(exc))
        return Message(report.to_content(), reply_to=msg)
    if not policy.federated_evaluation:
        reason = (
            f"this node's privacy policy ({policy.source}) says federated-evaluation = "
            "false: local test metrics are not covered by DP"
        )
        report = EvaluateReport.policy_refused(shard.partition_id, reason)
        return Message(report.to_content(), reply_to=msg)
    if len(shard.x_test) == 0:
        raise ValueError(
            f"partition {shard.partition_id} has no local test split "
            f"(local-test-fraction={cfg.local_test_fraction}); nothing to evaluate"
        )
    if deployed(context) and len(shard.x_test) < MIN_TEST_RECORDS:
        reason = (
            f"run config key 'local-test-fraction' leaves fewer than {MIN_TEST_RECORDS} "
            "local test records; metrics of so few records would describe single records"
        )
        report = EvaluateReport.policy_refused(shard.partition_id, reason)
        return Message(report.to_content(), reply_to=msg)
    model = _model_from(msg, cfg, shard)
    scores = evaluate_task(cfg.task, model, shard.x_test, shard.y_test)
    report = EvaluateReport.scored(shard.partition_id, len(shard.x_test), scores)
    return Message(report.to_content(), reply_to=msg)


evaluate = sanitised(_evaluate, evaluate_failed)
