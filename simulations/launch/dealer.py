"""The simulation launcher as secure aggregation's trusted dealer.

In a simulation nobody but the launcher can certify the partitions' identities: it
makes a fresh CA per launch (its key is never written), one Ed25519 identity per
partition, and hands the folder to the ClientApps through the environment of the
SuperLink that runs them (``$PRIVFED_SECAGG_DEALER``), never through the run
config, which the server writes. With an external Ray cluster
(``--ray-address``), the folder must be readable at the same path on every Ray
node, and the cluster's workers need the variable (docs/secure-aggregation.md).
"""

from __future__ import annotations

from pathlib import Path

from common.secure_aggregation.identity import DEALER_ENV
from simulations.deployment.node_identity import deal_identities


def trusted_dealer(env: dict[str, str], work: Path, partitions: int) -> Path:
    """Deal ``partitions`` identities into ``work/dealer`` and name it in ``env``."""
    folder = deal_identities(work / "dealer", partitions)
    env[DEALER_ENV] = str(folder)
    return folder
