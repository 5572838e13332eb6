"""A simulated SuperNode that hosts many virtual clients.

See docs/simulation.md, "Virtual clients".

Each virtual client is one partition with its own context: its node ID
(:func:`common.wire.virtual_group.virtual_node_id`), its ``partition-id``, and its
own slice of the SuperNode's ``context.state`` (its ledger copy, its
secure-aggregation secrets). A group message is answered by running the ordinary
ClientApp handler once per virtual client, in turn, so every privacy rule, ledger
and noise draw is the one a lone client has; only the transport is shared.

Simulation only: a SuperNode with its own data or state folder (a device) refuses
group messages, and a SuperNode trains only the partitions its ``node_config``
gives it, whatever the server asks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict

from client.data.local_data import ClientShard, load_client_shard, shards_kept_for_group
from client.failure_replies import Handler, deployed
from client.node_settings import NodeSettings
from client.training import vectorised
from common.atomic_files import deferred_sync
from common.config import RunConfig, run_config_of
from common.data.checks import DatasetError
from common.privacy.randomness import reproducible_seed, round_generator
from common.wire.reply_fields import ARRAYS_KEY
from common.wire.virtual_group import (
    HOSTED_KEY,
    Entry,
    hosted_partitions,
    pack,
    unpack,
)

log = logging.getLogger("privfed.client")

ModelFrom = Callable[[Message, RunConfig, ClientShard], torch.nn.Module]
STATE_PREFIX = "vc"  # context.state key "vc<partition>/<key>": a virtual client's record
# Flower's code for an exception raised by a ClientApp (flwr ErrorCode, 1.42)
CLIENT_APP_RAISED_EXCEPTION = 2


class VirtualClientError(ValueError):
    """A group message this SuperNode must not answer (not a simulation, or a
    partition it does not host)."""


def _hosting(context: Context) -> tuple[range, int]:
    """The partitions this SuperNode hosts, and the run's number of virtual clients."""
    config = dict(context.node_config)
    if deployed(context):
        raise VirtualClientError(
            "a SuperNode with its own data or state-dir is one client; virtual "
            "clients exist only in a simulation (run config key 'virtual-clients')"
        )
    total = run_config_of(context.run_config).virtual_clients
    first, step = config.get("partition-id"), config.get("num-partitions")
    if total < 1 or not isinstance(first, int) or not isinstance(step, int):
        raise VirtualClientError(
            "run config key 'virtual-clients' is 0 or the node config lacks "
            "'partition-id'/'num-partitions': this SuperNode hosts no virtual clients"
        )
    return hosted_partitions(first, step, total), total


def discovery(msg: Message, context: Context) -> Message:
    """Which partitions this SuperNode hosts (asked once by the server's grid)."""
    hosted, total = _hosting(context)
    record = ConfigRecord(
        {"first": hosted.start, "step": hosted.step, "total": total}  # a range
    )
    return Message(RecordDict({HOSTED_KEY: record}), reply_to=msg)


def _split_state(state: RecordDict) -> dict[int, dict[str, object]]:
    """The SuperNode's state by virtual client (one pass over its keys)."""
    by_partition: dict[int, dict[str, object]] = {}
    for key, record in state.items():
        head, sep, rest = key.partition("/")
        if sep and head.startswith(STATE_PREFIX) and head[len(STATE_PREFIX) :].isdigit():
            by_partition.setdefault(int(head[len(STATE_PREFIX) :]), {})[rest] = record
    return by_partition


def _instruction(group: Message, entry: Entry) -> Message:
    """The entry as a SuperNode would have delivered it to the virtual client alone."""
    meta = group.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id=entry.message_id,
        src_node_id=meta.src_node_id,
        dst_node_id=entry.node_id,
        reply_to_message_id="",
        group_id=meta.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=entry.message_type,
    )
    return Message(content=entry.content, metadata=metadata)


def _precompute(
    msg: Message, entries: list[Entry], context: Context, total: int, model_from: ModelFrom
) -> None:
    """Client-level rounds: train the group's clients at once (vectorised.py), for
    each client's own handler to take after its checks. Anything unusual (another
    mode, another model per client, a model vmap cannot batch, a shard that fails to
    load) leaves the clients to train one by one, as the handler then does."""
    cfg = run_config_of(context.run_config)
    plain = [e for e in entries if e.message_type == "train" and e.content is not None]
    if not (vectorised.ENABLED and cfg.is_client_level and not cfg.secure_aggregation):
        return
    if len(plain) < 2 or len({id(e.content[ARRAYS_KEY]) for e in plain}) != 1:
        return
    server_round = int(plain[0].content["config"]["server-round"])
    try:
        shards = [
            load_client_shard(
                cfg, NodeSettings(e.partition_id, total).in_results(cfg.results_dir)
            )
            for e in plain
        ]
    except DatasetError:
        return  # the failing client's own handler reports it
    torch.set_num_threads(cfg.torch_threads)  # as each client's handler sets it
    model = model_from(_instruction(msg, plain[0]), cfg, shards[0])
    if not vectorised.can_vectorise(model):
        return
    generators = [
        round_generator(reproducible_seed(cfg.seed, e.partition_id, server_round))
        for e in plain
    ]  # as _clipped_change draws them
    try:
        vectorised.precompute(
            model, [e.partition_id for e in plain], server_round,
            [(s.x_train, s.y_train) for s in shards], cfg, generators,
        )  # fmt: skip
    except Exception as exc:  # e.g. a user's loss that torch.func cannot batch
        vectorised.forget()
        log.warning(
            "task %s: batched training of %d virtual clients failed (%s: %s); "
            "they train one by one",
            cfg.task, len(plain), type(exc).__name__, exc,
        )  # fmt: skip


def group_handler(run_one: Handler, model_from: ModelFrom | None = None) -> Handler:
    """A handler for group messages that runs ``run_one`` (the ClientApp) per entry;
    with ``model_from`` (the ClientApp's global-model builder), a client-level round's
    local training is batched over the group first."""

    def run(msg: Message, context: Context) -> Message:
        hosted, total = _hosting(context)
        entries = unpack(msg.content)
        stray = [e.partition_id for e in entries if e.partition_id not in hosted]
        if stray:
            raise VirtualClientError(
                f"the server sent partitions {stray[:5]} to the SuperNode hosting "
                f"{hosted.start}::{hosted.step} of {total}; refused, nothing trained"
            )
        try:
            with shards_kept_for_group():  # loaded by _precompute, again by each handler
                if model_from is not None:
                    _precompute(msg, entries, context, total, model_from)
                with deferred_sync():  # every client's ledger on disk before the reply
                    return _run_each(msg, context, entries, total, run_one)
        finally:
            vectorised.forget()

    return run


def _run_each(
    msg: Message, context: Context, entries: list[Entry], total: int, run_one: Handler
) -> Message:
    """Each entry through the ClientApp with its own context; one group reply."""
    states = _split_state(context.state)
    replies = []
    for entry in entries:
        pid = entry.partition_id
        own = RecordDict(states.get(pid, {}))  # type: ignore[arg-type]
        sub = Context(
            run_id=context.run_id,
            node_id=entry.node_id,
            node_config={"partition-id": pid, "num-partitions": total},
            state=own,
            run_config=context.run_config,
        )
        try:
            reply = run_one(_instruction(msg, entry), sub)
        except Exception as exc:  # as Flower reports a ClientApp's exception
            log.exception("virtual client %d: %s failed", pid, entry.message_type)
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            error = Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            replies.append(_reply_entry(entry, None, error))
            continue
        _store_state(context.state, pid, states.get(pid, {}), sub.state)
        if reply.has_error():
            replies.append(_reply_entry(entry, None, reply.error))
        else:
            replies.append(_reply_entry(entry, reply.content, None))
    return Message(pack(replies), reply_to=msg)


def _reply_entry(entry: Entry, content: RecordDict | None, error: Error | None) -> Entry:
    return Entry(
        entry.node_id, entry.partition_id, entry.message_id, entry.message_type,
        content=content, error=error,
    )  # fmt: skip


def _store_state(
    state: RecordDict, pid: int, before: dict[str, object], after: RecordDict
) -> None:
    """Write a virtual client's state back under its prefix (removed keys go)."""
    prefix = f"{STATE_PREFIX}{pid}/"
    for key in set(before) - set(after.keys()):
        del state[prefix + key]
    for key, record in after.items():
        state[prefix + key] = record
