"""The pfl peer trains on exactly the records and shards privfed's clients get.

``simulations.bench.scale --pfl-python`` writes them; ``pfl_peer.records_workload``
reads them in pfl's venv (numpy and torch only, so it is importable here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.data.partitioning import PartitionSpec, partition_indices, split_local
from common.tasks.registry import get_task
from simulations.bench import scale

PEER = Path(scale.__file__).with_name("pfl_peer.py")


def _peer_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("pfl_peer", PEER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clients", [4, 977])
def test_the_peer_reads_privfeds_own_shards_and_test_set(
    tmp_path: Path, clients: int
) -> None:
    npz = tmp_path / "records.npz"
    scale.write_records("nwtco", "", clients, npz)
    shards, (x_test, y_test), model = _peer_module().records_workload(npz)

    cfg = RunConfig(task="nwtco", partitioner="iid", local_test_fraction=0.0)
    assert cfg.seed == scale.SEED  # the bench's shards are those of a default run
    task = get_task("nwtco")
    x, y = task.raw("train", "", cfg.seed)
    expected = partition_indices(np.asarray(y), PartitionSpec.for_run(cfg, clients), 2)
    assert sorted(shards) == list(range(clients))
    for pid, indices in enumerate(expected):
        train, _ = split_local(indices, cfg.local_test_fraction, cfg.seed, pid)
        np.testing.assert_array_equal(shards[pid][0], np.asarray(x)[train])
        np.testing.assert_array_equal(shards[pid][1], np.asarray(y)[train])
    x_t, y_t = task.raw("test", "", cfg.seed)
    np.testing.assert_array_equal(x_test, x_t)
    np.testing.assert_array_equal(y_test, y_t)
    # privfed's logistic regression: zero-initialised, one weight per feature and class
    assert model.net.weight.shape == (2, x.shape[1])
    assert not model.net.weight.any() and not model.net.bias.any()


def test_the_peer_needs_a_client_level_tabular_run() -> None:
    with pytest.raises(SystemExit) as refused:
        scale.main(["--pfl-python", "/bin/false", "--dataset", "digits"])
    assert refused.value.code == 2
