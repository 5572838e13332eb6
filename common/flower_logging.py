"""Each Flower log record printed once, in Flower's own format.

Opacus calls ``logging.basicConfig`` when it is imported (``opacus/utils/
module_utils.py``), which gives the root logger a stderr handler. Flower's
``flwr`` logger has its own console handler and propagates to the root logger,
so in every process that imports Opacus (the ServerApp, the ClientApps) each
Flower line came out twice, the second time with Opacus's format and with
Flower's DEBUG records too. Flower's records stop at Flower's handler.
"""

from __future__ import annotations

import logging

FLOWER_LOGGER = "flwr"


def keep_flower_logs_single() -> None:
    """Stop ``flwr`` records from reaching the root logger's handlers."""
    logging.getLogger(FLOWER_LOGGER).propagate = False
