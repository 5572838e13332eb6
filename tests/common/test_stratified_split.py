"""Our stratified split against scikit-learn's, which it replaces to keep processes
from importing scikit-learn (common/data/stratified_split.py): the same indices, in
the same order, and the same refusals."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from common.data.checks import DatasetError
from common.data.stratified_split import stratified_split
from common.tasks.digits import TEST_FRACTION, digits_files, load_digits_file, read_digits
from common.tasks.registry import get_task


def _sklearn(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    index = np.arange(len(labels))
    train, test = train_test_split(
        index, test_size=fraction, random_state=seed, stratify=labels
    )
    return train, test


LABEL_SETS = {
    # ties in the remainders (equal class sizes) make both rounding steps draw
    "balanced": np.repeat(np.arange(5), 8),
    "skewed": np.concatenate([np.zeros(50), np.ones(7), np.full(3, 2), np.full(11, 3)]),
    "strings": np.array(list("abcab" * 9 + "cc")),
    "digits": load_digits().target,
}


@pytest.mark.parametrize("name", sorted(LABEL_SETS))
@pytest.mark.parametrize("fraction", [0.2, 0.25, 1 / 3, 0.5])
def test_same_indices_as_scikit_learn(name: str, fraction: float) -> None:
    labels = LABEL_SETS[name]
    for seed in range(12):
        ours = stratified_split(labels, fraction, seed)
        theirs = _sklearn(labels, fraction, seed)
        assert np.array_equal(ours[0], theirs[0]), (name, fraction, seed)
        assert np.array_equal(ours[1], theirs[1]), (name, fraction, seed)


def test_a_different_seed_draws_a_different_split() -> None:
    labels = LABEL_SETS["digits"]
    a, b = stratified_split(labels, 0.2, 0), stratified_split(labels, 0.2, 1)
    assert not np.array_equal(a[1], b[1])
    assert sorted(np.concatenate(a)) == list(range(len(labels)))  # a partition


def test_refuses_what_scikit_learn_refuses() -> None:
    with pytest.raises(ValueError, match=r"classes \[2\] have fewer than 2"):
        stratified_split(np.array([0, 0, 1, 1, 2]), 0.4, 0)
    with pytest.raises(ValueError, match="cannot hold all 3 classes"):
        stratified_split(np.repeat([0, 1, 2], 4), 0.1, 0)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        stratified_split(np.repeat([0, 1], 4), 1.0, 0)
    with pytest.raises(ValueError, match="1-D"):
        stratified_split(np.zeros((4, 2)), 0.5, 0)


@pytest.mark.parametrize("seed", [0, 7, 42])
def test_digits_parts_equal_load_digits_and_train_test_split(seed: int) -> None:
    """The task's raw parts are what scikit-learn's own loader and split give."""
    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.images, bunch.target, test_size=TEST_FRACTION, random_state=seed,
        stratify=bunch.target,
    )  # fmt: skip
    task = get_task("digits")
    for part, (x, y) in {"train": (x_tr, y_tr), "test": (x_te, y_te)}.items():
        got_x, got_y = read_digits(task, "", seed, part)
        assert got_x.dtype == x.dtype and got_y.dtype == y.dtype
        assert np.array_equal(got_x, x) and np.array_equal(got_y, y)


def test_a_damaged_digits_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "digits.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n4,5,6\n")
    with pytest.raises(DatasetError, match=r"digits\.csv\.gz: expected 65"):
        load_digits_file(bad)
    assert digits_files(get_task("digits"), "")[0].name == "digits.csv.gz"


def test_a_tabular_federation_splits_as_scikit_learn_would() -> None:
    """Tabular federations stratify by (label, site) with the same split."""
    from common.data.tabular.federations import TEST_FRACTION as TABULAR_TEST
    from common.data.tabular.federations import encode_records, load_federation

    records = encode_records("nwtco")
    assert records.sites is not None
    strata = records.y * (int(records.sites.max()) + 1) + records.sites
    theirs = train_test_split(
        records.x, records.y, records.sites,
        test_size=TABULAR_TEST, random_state=3, stratify=strata,
    )  # fmt: skip
    f = load_federation("nwtco", 3)
    ours = [f.x_train, f.x_test, f.y_train, f.y_test, f.site_train, f.site_test]
    for a, b in zip(theirs, ours, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
