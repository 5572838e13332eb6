"""End to end: the main-job script runs a real Flower simulation and cleans up."""

from __future__ import annotations

import csv
import json
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common.ledger.privacy_ledger import epsilon_of_history
from server.results.outcome import Outcome
from simulations.engine.process_workers import WORKER_NAME
from simulations.launch.superexec_fork import PROCESS_NAME as FORKED_SUPEREXEC
from simulations.launch.superexec_wakeup import MODULE as WAKEUP_MODULE
from simulations.launch.warm_template import MODULE as WARM_MODULE
from tests.helpers.docs import results_python_snippet
from tests.helpers.process_watch import (
    Watch,
    assert_all_gone,
    assert_loopback_only,
    run_watched,
    signal_after,
)
from tests.helpers.runs_ahead import RunsAhead, runs_ahead

pytestmark = pytest.mark.e2e


def _rounds(results: Path) -> list[dict]:
    return [
        json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()
    ]


def test_main_job_three_clients_two_rounds(tmp_path: Path) -> None:
    """3 clients x 2 rounds: results folder, cumulative ε, learning, nothing left over."""
    results = tmp_path / "run"
    code, out, watch = run_watched(
        ["--clients", "3", "--rounds", "2", "--results-dir", str(results)]
    )
    assert code == 0, out[-4000:]
    assert f"[privfed] results: {results}" in out
    assert "[privfed] round 2/2" in out
    # Each ServerApp line once (Opacus's root handler used to print Flower's twice).
    assert out.count("[privfed] round 1/2 |") == 1, out[-4000:]
    assert out.count("3 nodes connected; starting 2 rounds") == 1
    for name in ("config.json", "rounds.jsonl", "summary.json", "model.pt"):
        assert (results / name).is_file(), name
    for name in ("accuracy.png", "epsilon.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rounds = _rounds(results)
    assert [r["round"] for r in rounds] == [1, 2]
    previous: dict[int, float] = {}
    for record in rounds:
        assert record["accountant"] == "opacus-rdp" and record["delta"] == 1e-5
        assert record["clients_trained"] == 3
        assert {c["partition_id"] for c in record["clients"]} == {0, 1, 2}
        for client in record["clients"]:
            # Anyone can recompute each ε from the logged (σ, q, steps) history.
            recomputed = epsilon_of_history(
                [tuple(h) for h in client["history"]], client["delta"], "rdp"
            )
            assert client["epsilon"] == pytest.approx(recomputed, rel=1e-9)
            assert client["epsilon"] >= previous.get(client["partition_id"], 0.0)
            previous[client["partition_id"]] = client["epsilon"]
        assert record["max_epsilon"] == pytest.approx(
            max(c["epsilon"] for c in record["clients"])
        )
    assert rounds[-1]["central"]["accuracy"] > 0.3  # chance is 0.1

    for record in rounds:  # the time of each round is broken down
        timing = record["timing_seconds"]
        assert 0 < timing["client_compute_max"] <= timing["client_compute_sum"]
        assert timing["orchestration"] > 0
        assert record["seconds"] >= timing["client_compute_max"]
    assert "[privfed] time: launch to round 1" in out

    # Each reply is the DP-noised change, int4-encoded (the default update-compression):
    # under a quarter of the model's float32 weights alone, let alone the float32 reply.
    float32 = 4 * 4810  # the digits MLP
    for record in rounds:
        sizes = record["message_bytes"]
        assert sizes["update_encoding"] == "int4"
        assert sizes["train"]["up_clients"] == sizes["train"]["down_clients"] == 3
        assert 0 < sizes["train"]["up_per_client_max"] < float32 / 4
        assert sizes["train"]["down_per_client_median"] > float32  # the global model

    summary = json.loads((results / "summary.json").read_text())
    assert summary["message_bytes"]["up_total"] == sum(
        r["message_bytes"]["train"]["up_total"] for r in rounds
    )
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 2
    assert summary["time_breakdown_seconds"]["startup_to_round_1"] > 0
    assert summary["orchestration_seconds_per_round_median"] > 0
    assert (results / "model.ts").is_file() and (results / "model.json").is_file()
    assert summary["max_epsilon"] <= 8.0  # the default per-client target
    config = json.loads((results / "config.json").read_text())
    assert config["run_config"]["num-rounds"] == 2
    assert config["run_config"]["min-available-nodes"] == 3
    assert "fresh OS entropy" in config["noise"] == summary["noise"]
    assert summary["noise_reproducible"] is False and summary["privacy_unit"] == "record"
    assert "per record" in summary["epsilon_text"] and "opacus-rdp" in out

    # docs/results-format.md's loading-and-recomputing example works on a real run folder.
    snippet = results_python_snippet().replace("results/RUN", str(results))
    exec(compile(snippet, "docs/results-format.md", "exec"), {})

    # on the process engine a single run's flwr-simulation is forked from a template
    # that imported what it needs while the SuperLink started, and it forked the
    # ClientApp workers (docs/simulation.md, "Engines")
    scripts = [c for c in watch.commands if "/flwr-simulation --" in c]
    assert len(scripts) == 1 and "/privfed-warm-" in scripts[0], scripts
    assert "[privfed] Engine: process engine, " in out
    workers = [p for p, name in watch.programs.items() if name == WORKER_NAME]
    assert 1 <= len(workers) <= 3, watch.programs
    # the SuperLink's SuperExec was forked from it (not started cold) and woken by
    # the run, not asking every 0.2 s
    assert FORKED_SUPEREXEC in watch.programs.values(), watch.programs
    assert not any(f"-m {WAKEUP_MODULE} superexec " in c for c in watch.commands)
    assert not any("/flower-superexec " in c for c in watch.commands)
    assert_loopback_only(watch)
    assert_all_gone(watch)


def test_run_stops_cleanly_when_every_budget_is_spent(tmp_path: Path) -> None:
    """With a budget for two rounds, round 3 is refused by all and the run ends."""
    results = tmp_path / "run"
    code, out, watch = run_watched(
        [
            "--clients", "2", "--rounds", "5", "--noise-multiplier", "1.0",
            "--epsilon-budget", "3.0", "--results-dir", str(results),
        ]
    )  # fmt: skip
    assert code == 0, out[-4000:]
    rounds = _rounds(results)
    assert [r["clients_trained"] for r in rounds] == [2, 2, 0]
    assert rounds[-1]["clients_refused"] == 2
    assert all(c["status"] == "budget-exhausted" for c in rounds[-1]["clients"])
    assert all(c["epsilon"] <= 3.0 for c in rounds[-1]["clients"])
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "budget-exhausted"
    assert "every client refused to train (budget-exhausted;" in summary["stop_reason"]
    assert summary["budget_refusals"] == 2 and summary["rounds_completed"] == 3
    assert "refused to train (budget-exhausted)" in out
    assert_all_gone(watch)


def _figures(results: Path) -> list[tuple]:
    """Each round's central accuracy and loss, and each client's (partition, ε)."""
    return [
        (
            r["central"]["accuracy"],
            r["central"]["loss"],
            sorted((c["partition_id"], c["epsilon"]) for c in r["clients"]),
        )
        for r in _rounds(results)
    ]


def test_reproducible_noise_runs_are_identical_and_say_they_are_not_private(
    tmp_path: Path,
) -> None:
    """reproducible-noise = true: the log, config.json and summary.json all say so,
    and two runs with the default codec (int4, stochastic rounding) write identical
    accuracies and ε to rounds.jsonl."""
    runs = [tmp_path / name for name in ("a", "b")]

    # The two runs are independent federations (own SuperLink, ports, Ray), so they
    # run side by side: each spends much of its time waiting, not computing.
    def run(results: Path) -> tuple[int, str, Watch]:
        return run_watched(
            ["--clients", "3", "--rounds", "2", "--set", "reproducible-noise=true",
             "--results-dir", str(results)]
        )  # fmt: skip

    with ThreadPoolExecutor(len(runs)) as pool:
        done = list(pool.map(run, runs))
    statement = "noise reproducible from the seed: not private against the server"
    for results, (code, out, watch) in zip(runs, done, strict=True):
        assert code == 0, out[-4000:]
        assert_all_gone(watch)
        assert f"reproducible-noise = true: {statement}" in out
        assert f"[privfed] WARNING: {statement}" in out
        assert json.loads((results / "config.json").read_text())["noise"] == statement
        summary = json.loads((results / "summary.json").read_text())
        assert summary["noise"] == statement and summary["noise_reproducible"] is True
    first, second = (_figures(results) for results in runs)
    assert len(first) == 2 and all(len(clients) == 3 for _, _, clients in first)
    assert all(r["message_bytes"]["update_encoding"] == "int4" for r in _rounds(runs[0]))
    assert first == second


def test_bad_option_fails_before_starting_anything(tmp_path: Path) -> None:
    """A bad run-config value exits 2 with a message naming the key."""
    code, out, watch = run_watched(
        ["--clients", "2", "--set", "batch-size=0", "--results-dir", str(tmp_path / "r")],
        timeout=120,
    )
    assert code == 2
    assert "'batch-size'" in out and ">= 1" in out
    assert not watch.pids
    assert not (tmp_path / "r").exists()


def test_missing_dataset_files_fail_before_starting(tmp_path: Path) -> None:
    """An IDX dataset without its files exits 2 naming 'data-dir' and the files."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, watch = run_watched(
        [
            "--dataset",
            "mnist",
            "--data-dir",
            str(empty),
            "--results-dir",
            str(tmp_path / "r"),
        ],
        timeout=120,
    )
    assert code == 2
    assert "'data-dir'" in out and "train-images-idx3-ubyte.gz" in out
    assert not watch.pids


def _work_dir(out: str) -> Path:
    """The launcher's Flower home and logs folder, as it prints it."""
    line = next(x for x in out.splitlines() if "[privfed] Flower home and logs:" in x)
    return Path(line.split("logs:", 1)[1].strip())


def test_ctrl_c_stops_the_run_with_flwr_stop_and_every_process(tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it (SIGINT to the whole foreground process group)
    mid-run: the launcher alone gets it, stops the run with `flwr stop` while the
    SuperLink still runs, exits 130 and leaves no process; summary.json says
    interrupted, with the rounds done, the last accuracy and max ε with its
    accountant, δ and unit."""
    results = tmp_path / "r"
    # Rounds of 2 clients take 0.1-0.2 s: 50 of them could end before `flwr stop`
    # (a CLI start) lands on a busy machine, and the run then completes (it did once).
    code, out, watch = signal_after(
        "simulations.run",
        ["--clients", "2", "--rounds", "500", "--results-dir", str(results)],
        "[privfed] round 1/500",
        signal.SIGINT,
        to_group=True,
    )
    assert code == 130, out[-3000:]
    # the process engine's ClientApp workers ran, and are gone with the rest
    assert WORKER_NAME in watch.programs.values(), watch.programs
    assert_all_gone(watch)
    run_id = re.search(r"Successfully started run (\d+)", out).group(1)  # type: ignore[union-attr]
    assert f"[privfed] run {run_id} stopped (flwr stop)" in out, out[-3000:]
    superlink_log = (_work_dir(out) / "superlink.log").read_text()
    assert "ControlServicer.StopRun" in superlink_log
    rounds = _rounds(results)  # what was recorded before the signal is intact
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["stop_reason"] == "the launcher was interrupted by SIGINT (Ctrl-C)"
    assert summary["rounds_completed"] == len(rounds) >= 1
    assert summary["rounds_planned"] == 500
    assert summary["final_central"] == rounds[-1]["central"]
    assert summary["max_epsilon"] == rounds[-1]["max_epsilon"] > 0
    assert (summary["accountant"], summary["delta"]) == ("opacus-rdp", 1e-5)
    assert summary["privacy_unit"] == "record" and "per record" in summary["epsilon_text"]
    assert "run INTERRUPTED" in out and "round(s) completed (last accuracy" in out
    assert out.count("[privfed] round 1/500 |") == 1


def test_timeout_stops_the_run_and_the_summary_says_timed_out(tmp_path: Path) -> None:
    """--timeout passing: the run is stopped with `flwr stop`, exit 124, nothing
    left running, and summary.json says timed-out (one name: Outcome.TIMED_OUT)."""
    results = tmp_path / "r"
    code, out, watch = run_watched(
        ["--clients", "2", "--rounds", "50", "--timeout", "1",
         "--results-dir", str(results)]
    )  # fmt: skip
    assert code == Outcome.TIMED_OUT.exit_code == 124, out[-3000:]
    assert "[privfed] time limit reached; stopping the run" in out
    assert re.search(r"\[privfed\] run \d+ stopped \(flwr stop\)", out), out[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == Outcome.TIMED_OUT.value == "timed-out"
    assert summary["stop_reason"] == "the launcher's --timeout passed"
    assert summary["rounds_planned"] == 50 and summary["written_by"] == "launcher"
    assert "run TIMED-OUT" in out
    assert_all_gone(watch)


def test_serverapp_failure_leaves_a_failed_summary_and_exit_1(tmp_path: Path) -> None:
    """A ServerApp that fails (no reply can arrive within round-timeout) writes
    summary.json with failed and the reason, and the launcher exits non-zero."""
    results = tmp_path / "r"
    code, out, watch = run_watched(
        ["--clients", "2", "--rounds", "2", "--set", "round-timeout=0.001",
         "--results-dir", str(results)]
    )  # fmt: skip
    assert code == 1, out[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["stop_reason"] == ("RoundFailed: round 1: no client replied in time"), (
        summary["stop_reason"]
    )
    assert summary["rounds_completed"] == 0 and summary["rounds_planned"] == 2
    assert "RoundFailed" in summary["traceback"] and "written_by" not in summary
    assert "run FAILED" in out and "no client replied in time" in out
    assert_all_gone(watch)


def _sweep_run(folder: Path) -> tuple[int, str, Watch, Path]:
    code, out, watch = run_watched(
        ["--epsilons", "4", "8", "--partitioners", "iid", "--clients", "2",
         "--rounds", "1", "--no-reference", "--out", str(folder), "--engine", "ray"],
        module="simulations.sweep",
    )  # fmt: skip
    return code, out, watch, folder


SWEEP_TEST = "test_sweep_runs_every_point_on_one_superlink"


@pytest.fixture(scope="module", autouse=True)
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunsAhead]:
    """The sweep (two runs on one SuperLink) starts with the module, beside the
    other tests' runs: each is a federation of its own."""
    with runs_ahead(request, tmp_path_factory, {SWEEP_TEST: _sweep_run}) as runs:
        yield runs


def test_sweep_runs_every_point_on_one_superlink(ahead: RunsAhead, tmp_path: Path) -> None:
    """A two-point sweep on the Ray engine: one SuperLink and one private Ray head for
    both runs, each
    run with its own results folder and summary, a table and plot, the launch time
    per run, and nothing left running after (both are stopped by PID)."""
    code, out, watch, swept = ahead.result(SWEEP_TEST, _sweep_run, tmp_path)
    assert code == 0, out[-4000:]
    superlinks = [  # (the warm template's own command line names it too)
        c for c in watch.commands if c.split()[1:4] == ["-m", WAKEUP_MODULE, "superlink"]
    ]
    assert len(superlinks) == 1, watch.commands
    gcs = [pid for pid, name in watch.programs.items() if name == "gcs_server"]
    assert len(gcs) == 1, watch.programs  # Ray started once, not once per point
    assert re.search(r"Ray: a private Ray head on 127\.0\.0\.1:\d+ \(\d+ CPUs\)", out)
    assert any("ray::ClientAppActor" in c for c in watch.commands), watch.commands
    table = list(csv.DictReader((swept / "sweep.csv").read_text().splitlines()))
    assert [r["name"] for r in table] == ["eps4-iid-seed0", "eps8-iid-seed0"]
    for row in table:
        summary = json.loads((swept / row["name"] / "summary.json").read_text())
        assert summary["status"] == row["status"] == "completed"
        assert (
            float(row["max_epsilon"])
            == summary["max_epsilon"]
            <= float(row["target_epsilon"])
        )
        assert 0 < float(row["launch_to_round_1_seconds"]) < 120
        assert "[privfed] results:" in (swept / f"{row['name']}.log").read_text()
    assert "| 8 | iid | 0 |" in (swept / "sweep.md").read_text()
    assert (swept / "accuracy_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    assert "s per run amortised over 2 runs" in out
    assert "SuperLink and engine start" in out and "of the sweep's wall time per run" in out
    # both points' flwr-simulation were forked from the SuperLink's warm template (one
    # for the sweep): a cold start would show the venv's own flwr-simulation instead
    templates = [c for c in watch.commands if f"-m {WARM_MODULE} flwr-simulation -- " in c]
    assert len(templates) == 1, sorted(watch.commands)
    scripts = [c for c in watch.commands if "/flwr-simulation --" in c]
    assert len(scripts) == 2 and all("/privfed-warm-" in c for c in scripts), scripts
    assert_loopback_only(watch)
    assert_all_gone(watch)


def test_interrupted_sweep_stops_its_run_and_its_superlink(tmp_path: Path) -> None:
    """SIGTERM while the first point runs: that run is stopped (flwr stop) and
    summarised as interrupted, the second never starts, exit 130, nothing left."""
    code, out, watch = signal_after(
        "simulations.sweep",
        ["--epsilons", "4", "8", "--partitioners", "iid", "--clients", "2",
         "--rounds", "500", "--no-reference", "--out", str(tmp_path)],
        "[sweep] start eps4-iid-seed0",
        signal.SIGTERM,
    )  # fmt: skip
    assert code == 130, out[-3000:]
    assert_all_gone(watch)
    table = list(csv.DictReader((tmp_path / "sweep.csv").read_text().splitlines()))
    assert table[0]["status"] == "interrupted (exit 130)"
    assert table[1]["status"] == "not started (the sweep was interrupted)"
    summary = json.loads((tmp_path / "eps4-iid-seed0" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["stop_reason"]
    assert not (tmp_path / "eps8-iid-seed0").exists()
    log = (tmp_path / "eps4-iid-seed0.log").read_text()
    assert re.search(r"\[privfed\] run \d+ stopped \(flwr stop\)", log), log[-3000:]
    assert "[sweep] interrupted by SIGTERM" in out
