"""A client's own ε against the server, from what it verified.

The server knows each cohort, so against it no amplification by sampling applies;
and it may misreport how many uploads a sum holds. A client therefore composes,
per round it helped unmask, the unsampled Skellam release of the uploads it
verified itself (certified signatures on the uploader set, never the server's
count), with the plan it checked was every participant's. Kept in
``context.state`` for the run (a SuperNode's memory, or the simulation's node state).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context

from common.secure_aggregation.distributed_dp import QuantisationPlan
from common.secure_aggregation.skellam_accounting import epsilon_from_rdp, round_rdp

EXPOSURE_KEY = "secagg-exposure"


def record_verified_release(
    context: Context, plan: QuantisationPlan, verified: int, delta: float
) -> float:
    """Add one round's release (``verified`` certified uploads of ``plan``) to this
    node's exposure; return its ε against the server at ``delta``."""
    release = plan.release(verified, 1.0)
    held = context.state.config_records.get(EXPOSURE_KEY)
    before = np.asarray(held["rdp"], dtype=float) if held is not None else 0.0
    total = before + round_rdp(release, amplified=False)
    rounds = int(held["rounds"]) + 1 if held is not None else 1
    context.state.config_records[EXPOSURE_KEY] = ConfigRecord(
        {"rdp": [float(v) for v in total], "rounds": rounds}
    )
    return epsilon_from_rdp(np.asarray(total), delta)
