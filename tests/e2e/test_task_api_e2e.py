"""The example task of docs/tasks.md, copied outside the checkout, in real runs.

A user's task is named ``module:attribute`` and found through ``PYTHONPATH``: the
launchers, the Ray workers of a simulation and the ClientApp processes of each
SuperNode must all import it. Each run's cumulative ε must match the ledger.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.privacy.ledger_store import LEDGER_FILE
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history
from tests.helpers.process_watch import Watch, assert_all_gone, run_watched
from tests.helpers.runs_ahead import RunsAhead, runs_ahead

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "simulations" / "examples" / "my_task.py"
ARGS = [
    "--task",
    "my_task:TASK",
    "--clients",
    "2",
    "--rounds",
    "2",
    "--set",
    "batch-size=16",
]


@pytest.fixture
def copied_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example, copied to a folder outside the checkout, on PYTHONPATH."""
    folder = tmp_path / "user-code"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "my_task.py")
    assert REPO not in folder.parents
    monkeypatch.setenv("PYTHONPATH", str(folder))
    return folder


def _check_epsilons(results: Path) -> list[dict]:
    """Every client's ε is its logged history's; the summary's max is the rounds'."""
    rounds = [json.loads(x) for x in (results / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rounds] == [2, 2]
    for record in rounds:
        for client in record["clients"]:
            history = [tuple(h) for h in client["history"]]
            assert client["epsilon"] == pytest.approx(
                epsilon_of_history(history, client["delta"], "rdp"), rel=1e-9
            )
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["max_epsilon"] == pytest.approx(rounds[-1]["max_epsilon"])
    assert summary["max_epsilon"] <= 8.0
    meta = json.loads((results / "model.json").read_text())
    assert meta["task"] == "my_task:TASK" and meta["input_shape"] == [13]
    assert meta["preprocessing"]["kind"] == "affine"
    return rounds


def test_example_task_trains_in_a_simulation(copied_task: Path, tmp_path: Path) -> None:
    results = tmp_path / "sim"
    code, out, watch = run_watched([*ARGS, "--results-dir", str(results)], timeout=300)
    assert code == 0, out[-4000:]
    _check_epsilons(results)
    assert_all_gone(watch)


def _deployment_run(folder: Path) -> tuple[int, str, Watch, Path]:
    """The example in a folder of its own, on this run's PYTHONPATH only (a run that
    starts ahead must not depend on the environment of the test beside it)."""
    code_dir = folder / "user-code"
    code_dir.mkdir()
    shutil.copy(EXAMPLE, code_dir / "my_task.py")
    results = folder / "dep"
    code, out, watch = run_watched(
        [*ARGS, "--results-dir", str(results)], timeout=300, module="simulations.deploy",
        env={"PYTHONPATH": str(code_dir)},
    )  # fmt: skip
    return code, out, watch, results


DEPLOYMENT_TEST = "test_example_task_trains_in_a_two_node_deployment"


@pytest.fixture(scope="module", autouse=True)
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunsAhead]:
    """The deployment starts with the module, beside the simulation."""
    with runs_ahead(request, tmp_path_factory, {DEPLOYMENT_TEST: _deployment_run}) as runs:
        yield runs


def test_example_task_trains_in_a_two_node_deployment(
    ahead: RunsAhead, tmp_path: Path
) -> None:
    code, out, watch, results = ahead.result(DEPLOYMENT_TEST, _deployment_run, tmp_path)
    assert REPO not in results.parents
    assert code == 0, out[-4000:]
    rounds = _check_epsilons(results)
    for client in rounds[-1]["clients"]:  # each node's ledger on disk says the same
        ledger = results / "nodes" / f"node-{client['partition_id']}" / LEDGER_FILE
        assert PrivacyLedger.from_json(ledger.read_text()).epsilon() == pytest.approx(
            client["epsilon"]
        )
    assert_all_gone(watch)
