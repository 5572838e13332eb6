"""A stratified train/test split, index for index the one scikit-learn draws.

Written here for a measured reason: importing any part of scikit-learn costs a
process 1.6 s here (it pulls in SciPy's stats), and the launcher's checks, the
ServerApp and every client's first message split the embedded digits (and a tabular
federation's records) before they do anything else. :func:`stratified_split` gives
the same indices as ``sklearn.model_selection.train_test_split(..., test_size=f,
random_state=seed, stratify=labels)`` for an integer seed, in the same order, so
runs, results and cached shards do not change;
``tests/common/test_stratified_split.py`` compares it with the installed
scikit-learn over many seeds, sizes and fractions.

The draw: the test part has ceil(f·n) records; each class gets its share of the
training and test sizes, rounded down, and the records still missing go to the
classes with the largest remainders (ties broken at random); each class's records are
permuted and cut; finally each part is permuted. All draws come from one
``numpy.random.RandomState(seed)``, in scikit-learn's order.
"""

from __future__ import annotations

import math

import numpy as np


def _shares(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` each class gets: its proportional share rounded down,
    plus one for the classes with the largest remainders (ties drawn at random)."""
    exact = counts / counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainder = exact - shares
    for value in np.unique(remainder)[::-1]:  # largest remainder first
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices into ``labels`` (1-D), each class split in proportion.

    Raises ``ValueError`` as scikit-learn would: a class with fewer than two records,
    or a part smaller than the number of classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    if n_train <= 0:
        raise ValueError(f"test_fraction {test_fraction} leaves no training record of {n}")
    classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        too_few = classes[counts < 2].tolist()
        raise ValueError(f"classes {too_few} have fewer than 2 records; cannot stratify")
    if min(n_train, n_test) < len(classes):
        raise ValueError(
            f"a split of {n_train} training and {n_test} test records cannot hold "
            f"all {len(classes)} classes"
        )
    by_class = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_shares = _shares(counts, n_train, rng)
    test_shares = _shares(counts - train_shares, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for members, n_tr, n_te in zip(by_class, train_shares, test_shares, strict=True):
        shuffled = members.take(rng.permutation(len(members)))
        train.extend(shuffled[:n_tr])
        test.extend(shuffled[n_tr : n_tr + n_te])
    return rng.permutation(train), rng.permutation(test)
