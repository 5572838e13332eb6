"""The ClientApp's handlers of the secure-aggregation stages (``train.secagg_*``).

Each stage checks the node's policy first, then runs the protocol step of
:mod:`client.secure_aggregation.stages`. A protocol violation wipes the round's
secrets and is refused with its reason (it says nothing about the data); the
server counts the node as dropped. The node's certified identity is read from
its own files (:func:`common.secure_aggregation.identity.identity_files`), never
from anything the server sends.

The ClientApp's shared steps (reading the node, training and clipping, replies)
are passed in as :class:`ClientSteps`, so this module does not import
``client.app`` and the app keeps one definition of each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, RecordDict

from client.failure_replies import data_refusal, partition_id
from client.node_settings import NodeSettings
from client.privacy.ledger_store import (
    ledger_lock,
    load_ledger,
    public_reason,
    reported_fingerprint,
    witnessed_in,
)
from client.privacy.policy import PolicyError, PrivacyPolicy, load_policy
from client.secure_aggregation import stages as secagg_stages
from client.secure_aggregation.exposure import record_verified_release
from common.config import RunConfig, run_config_of
from common.data.checks import DatasetError
from common.ledger.privacy_ledger import LedgerError
from common.secure_aggregation.identity import (
    IdentityError,
    TrustedIdentity,
    identity_files,
    read_identity,
)
from common.secure_aggregation.protocol import EPSILON_KEY, SECAGG_KEY, ProtocolError, Stage
from common.wire.reply import TrainReport
from common.wire.reply_fields import CLIP_NORM_KEY

log = logging.getLogger("privfed.client")
Handler = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class ClientSteps:
    """The training module's steps the masked-update stage reuses (``client.app``
    passes them in, so that the other stages never import torch)."""

    setup: Callable[[Context], tuple[RunConfig, NodeSettings, Any]]
    send: Callable[[Message, TrainReport], Message]
    clipped_change: Callable[..., tuple[list[str], Any, Any]]

    def __post_init__(self) -> None:
        if not all(callable(getattr(self, f)) for f in self.__dataclass_fields__):
            raise TypeError("every client step must be callable")


def secagg_refusal(cfg: RunConfig, policy: PrivacyPolicy) -> str | None:
    """Why this node takes no part in the stages, or ``None``."""
    refusal = policy.refusal_for_run(cfg)
    if refusal is None and not (cfg.is_client_level and cfg.secure_aggregation):
        refusal = (
            "run config keys 'privacy-mode' and 'secure-aggregation': the secure-"
            "aggregation stages serve privacy-mode 'client' with secure-aggregation = "
            f"true, got {cfg.privacy_mode!r} and {cfg.secure_aggregation}"
        )
    return refusal


def node_identity(node: NodeSettings) -> TrustedIdentity:
    """The node's certified identity and its CA, from its own files."""
    try:
        return read_identity(*identity_files(node.state_dir, node.partition_id))
    except IdentityError as exc:
        raise ProtocolError(f"no usable node identity: {exc}") from None


def secagg_stage(stage: Stage, steps: ClientSteps) -> Handler:
    """One stage's handler: the node's policy first, then the protocol step."""

    def handle(msg: Message, context: Context) -> Message:
        cfg = run_config_of(context.run_config)
        node = NodeSettings.from_node_config(dict(context.node_config))
        node = node.in_results(cfg.results_dir)
        pid = partition_id(context)
        try:
            policy = load_policy(cfg, node.state_dir)
            refusal = secagg_refusal(cfg, policy)
        except PolicyError as exc:
            refusal = str(exc)
        if refusal is not None:
            secagg_stages.forget(context)
            log.warning("node %d refuses %s: %s", context.node_id, stage.value, refusal)
            return steps.send(msg, TrainReport.policy_refused(pid, refusal))
        try:
            record = secagg_stages.stage_record(msg.content)
            if stage is Stage.MASKED_UPDATE:
                return masked_update(msg, context, policy, record, steps)
            if stage is Stage.SETUP:
                from common.tasks.models import model_dimension  # torch: this stage only

                out = secagg_stages.setup(
                    context, int(context.node_id), record, model_dimension(cfg),
                    policy.min_noise_multiplier, node_identity(node),
                )  # fmt: skip
            elif stage is Stage.SHARE_KEYS:
                ca = node_identity(node).ca_certificate
                out = secagg_stages.share_keys(context, record, ca)
            elif stage is Stage.CONSISTENCY:
                out = secagg_stages.consistency(context, record, node_identity(node))
            else:
                out, verified, plan = secagg_stages.unmask(context, record)
                epsilon = record_verified_release(context, plan, verified, policy.delta)
                out[EPSILON_KEY] = epsilon
                log.info(
                    "node %d: %d certified uploads verified; ε against the server %.3f "
                    "(unamplified, from what this node verified)",
                    context.node_id, verified, epsilon,
                )  # fmt: skip
        except ProtocolError as exc:
            secagg_stages.forget(context)
            log.warning("node %d refuses %s: %s", context.node_id, stage.value, exc)
            reason = f"secure aggregation: {exc}"
            return steps.send(msg, TrainReport.policy_refused(pid, reason))
        return Message(RecordDict({SECAGG_KEY: out}), reply_to=msg)

    return handle


def masked_update(
    msg: Message, context: Context, policy: PrivacyPolicy, record: Any, steps: ClientSteps
) -> Message:
    """Stage 3: decrypt the neighbours' shares, train, clip, then noise and mask."""
    started = time.perf_counter()
    try:
        cfg, node, shard = steps.setup(context)
    except DatasetError as exc:
        secagg_stages.forget(context)
        return data_refusal(msg, context, exc, TrainReport.data_error)
    held = secagg_stages.receive_shares(context, record)
    if msg.content["config"].get(CLIP_NORM_KEY) != held.setup.plan.clip_norm:
        raise ProtocolError(
            "the round's clip norm differs from the one its plan was made for"
        )
    with ledger_lock(node):
        try:
            witnessed = witnessed_in(msg.content["config"])
            ledger = load_ledger(context, node, cfg.accountant, policy.delta, witnessed)
        except LedgerError as exc:  # fail closed: never "nothing spent"
            secagg_stages.forget(context)
            log.error("partition %d refuses to train: %s", shard.partition_id, exc)
            return steps.send(
                msg, TrainReport.ledger_error(shard.partition_id, public_reason(exc))
            )
        _, clipped, ledger = steps.clipped_change(msg, context, cfg, node, shard, ledger)
    upload = secagg_stages.masked_upload(context, held, clipped.arrays)
    seconds = time.perf_counter() - started if policy.release_timing else None
    shown = ledger if policy.release_ledger else None
    report = TrainReport.masked_update(shard.partition_id, shown, seconds)
    report = report.with_fingerprint(reported_fingerprint(context, node))
    return Message(report.to_content(upload), reply_to=msg)
