"""A user's own task (the example of docs/tasks.md, imported from outside the
checkout) in the privacy modes beyond sample-level: central client-level DP and
secure aggregation, played in process through real ClientApps.

Sample-level runs of it are the e2e tests (tests/e2e/test_task_api_e2e.py); here the
same ``module:attribute`` task goes through DP-FedAvg's ledger and through SecAgg+
with distributed noise, where the unmasked sum must equal the plain sum exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from common.ledger.privacy_ledger import epsilon_of_history
from common.tasks.models import build_model
from common.tasks.registry import get_task
from server.app import make_strategy
from simulations.launch.in_process_federation import InProcessGrid, federation
from tests.helpers.secure_aggregation import (
    FIRST,
    NODES,
    Protocol,
    Recorder,
    plain_sum,
    secagg_cfg,
    server_identity,
    use_dealer,
)

REPO = Path(__file__).resolve().parents[2]
USER_TASK = "my_task:TASK"


@pytest.fixture(autouse=True)
def _user_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example copied outside the checkout and put on the import path."""
    folder = tmp_path / "user-code"
    folder.mkdir()
    shutil.copy(REPO / "simulations" / "examples" / "my_task.py", folder / "my_task.py")
    monkeypatch.syspath_prepend(str(folder))
    server_identity(monkeypatch)
    assert get_task(USER_TASK).num_classes == 3


def test_client_level_dp_fedavg_trains_a_user_task(tmp_path: Path) -> None:
    """Two rounds of central DP-FedAvg over 5 clients at q = 1: the model moves and
    the federation ledger's client-level ε is the RDP accountant's on its history."""
    cfg = secagg_cfg(tmp_path, task=USER_TASK, secure_aggregation=False, batch_size=16)
    contexts = federation(cfg, range(NODES), NODES, first_node=FIRST)
    grid = InProcessGrid(contexts)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True)
    strategy = make_strategy(cfg, out, 1)
    strategy.start_run(grid.get_node_ids())
    arrays = ArrayRecord(build_model(USER_TASK, seed=0).state_dict())
    for server_round in (1, 2):
        step = strategy.train_round(server_round, arrays, grid, 0.3)
        assert step.arrays is not None
    before, after = arrays.to_numpy_ndarrays(), step.arrays.to_numpy_ndarrays()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    ledger = json.loads((out / "federation-ledger.json").read_text())
    history = [tuple(h) for h in ledger["ledger"]["history"]]
    assert history == [(cfg.noise_multiplier, 1.0, 2)]
    assert ledger["privacy_unit"] == "client" and ledger["delta"] == cfg.delta
    assert ledger["epsilon"] == pytest.approx(
        epsilon_of_history(history, cfg.delta, "rdp"), rel=1e-9
    )


def test_secure_aggregation_of_a_user_task_unmasks_the_exact_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SecAgg+ with distributed Skellam noise on the user's model: the server's
    unmasked sum is exactly the sum of the clients' noised, quantised vectors."""
    use_dealer(tmp_path / "dealer", monkeypatch)
    recorder = Recorder(monkeypatch)
    protocol = Protocol(secagg_cfg(tmp_path, task=USER_TASK, batch_size=16))
    result = protocol.run()
    assert result.failure is None and len(result.contributors) == NODES
    assert np.array_equal(
        result.total, plain_sum(list(recorder.values.values()), protocol.plan)
    )
