"""The ClientApp Flower loads for every message, and which module answers each message.

A deployed SuperNode runs every message in a fresh ``flwr-clientapp`` process that
imports this module first, so it imports only what every message needs. Training,
evaluation and a simulated SuperNode's group of clients (:mod:`client.train_evaluate`)
need torch, imported when such a message arrives. The secure-aggregation stages
that only exchange keys, shares and checks (:mod:`client.secure_aggregation.handlers`)
do not: a process that answers one never imports torch, and its imports (Flower's
and ours) take 1.5 CPU-s instead of 3.6 (BENCHMARKS.md, "ClientApp message cost").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp

from client.failure_replies import Handler, sanitised, train_failed
from client.secure_aggregation.handlers import ClientSteps, secagg_stage
from common.secure_aggregation.protocol import Stage
from common.wire.reply import TrainReport
from common.wire.virtual_group import DISCOVERY_TYPE, GROUP_ACTION

TRAINING_MODULE = "client.train_evaluate"

app = ClientApp()


def _imported_when_called(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, looked up (and its module imported) each time it is called,
    so that a test replacing it in its module is obeyed."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return call


def _training(name: str) -> Handler:
    return _imported_when_called(TRAINING_MODULE, name)


def _send(msg: Message, report: TrainReport) -> Message:
    """A reply that carries a report and no update (a refusal)."""
    return Message(report.to_content(), reply_to=msg)


train = app.train()(_training("train"))
evaluate = app.evaluate()(_training("evaluate"))

# -- secure aggregation with distributed DP (client/secure_aggregation/handlers.py) --
# Only the masked-update stage trains: it alone imports the training module.
_SECAGG_STEPS = ClientSteps(
    setup=_training("_setup"),
    send=_send,
    clipped_change=_training("_clipped_change"),
)
for _stage in Stage:
    app.train(_stage.value)(sanitised(secagg_stage(_stage, _SECAGG_STEPS), train_failed))

# -- a simulated SuperNode hosting many clients (client/virtual_clients.py) ---------
app.train(GROUP_ACTION)(_training("train_group"))
app.evaluate(GROUP_ACTION)(_training("evaluate_group"))
app.query(DISCOVERY_TYPE.split(".")[1])(
    _imported_when_called("client.virtual_clients", "discovery")
)
