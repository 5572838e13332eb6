"""Tiny runs of the benchmark scripts, so that they cannot rot (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.runs_ahead import RunsAhead, runs_ahead

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_accountant_benchmark_smoke() -> None:
    """The accountant benchmark runs and its fast path agrees with Opacus."""
    out = _run("simulations.bench.accountant", "--repeats", "1", "--rounds", "10")
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| distinct") or line.startswith("| one")
    ]
    assert len(rows) == 2 and all(row.rstrip().endswith("| True |") for row in rows)
    (calibration,) = [line for line in out.splitlines() if line.startswith("| median of")]
    assert calibration.rstrip().endswith("| True |")  # the remembered σ is the same σ


def test_dp_overhead_benchmark_smoke() -> None:
    """The DP overhead benchmark runs every mode on a tiny digits shard."""
    out = _run(
        "simulations.bench.dp_overhead", "--dataset", "digits", "--examples", "200",
        "--batch-sizes", "32", "--repeats", "1",
    )  # fmt: skip
    for mode in ("non-private", "direct", "ghost", "hooks", "ew", "functorch"):
        assert f"| {mode} |" in out


def test_update_compression_benchmark_smoke() -> None:
    """The bytes table of every encoding, for the digits MLP: int4 under a quarter."""
    out = _run("simulations.bench.update_compression", "bytes", "--models", "digits")
    rows = {
        line.split("|")[2].strip(): float(line.split("|")[4])
        for line in out.splitlines()
        if line.startswith("| digits MLP")
    }
    assert rows["none"] == 1.0 and set(rows) == {"none", "float16", "int8", "int4", "int2"}
    assert rows["int2"] < rows["int4"] < 0.25 < rows["int8"] < rows["float16"] < 1


def test_secure_aggregation_benchmark_smoke() -> None:
    """What a dropout costs grows as uploads fall and as rounds add up against the
    server; one in-process round of bytes stays under 1.5x the float32 update."""
    out = _run("simulations.bench.secure_aggregation", "epsilon", "--rounds", "20")
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()]
    by_uploads = [float(r[2]) for r in cells if len(r) == 3 and r[0].isdigit()]
    against = [float(r[1]) for r in cells if len(r) == 2 and r[0].isdigit()]
    assert len(by_uploads) >= 2 and by_uploads == sorted(by_uploads, reverse=True)
    assert len(against) >= 2 and against == sorted(against)
    out = _run("simulations.bench.secure_aggregation", "bytes", "--clients", "3",
               "--models", "digits")  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("| digits"))
    assert float(row.split("|")[6].strip().rstrip("×")) <= 1.5, row


def _deployment_bench(_folder: Path) -> str:
    return _run(
        "simulations.bench.deployment", "--clients", "1", "--rounds", "1",
        "--settle-seconds", "0", "--idle-seconds", "1",
    )  # fmt: skip


DEPLOYMENT_TEST = "test_deployment_benchmark_smoke"


@pytest.fixture(scope="module", autouse=True)
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunsAhead]:
    """The deployment benchmark (a real SuperLink and SuperNode, mostly waiting)
    starts with the module, beside the in-process benchmarks (no timing asserted)."""
    with runs_ahead(
        request, tmp_path_factory, {DEPLOYMENT_TEST: _deployment_bench}
    ) as runs:
        yield runs


@pytest.mark.e2e
def test_deployment_benchmark_smoke(ahead: RunsAhead, tmp_path: Path) -> None:
    """The deployment benchmark measures RSS, bytes and each message's phases (from
    inside its flwr-clientapp process) on one real SuperNode."""
    out = ahead.result(DEPLOYMENT_TEST, _deployment_bench, tmp_path)
    assert "status completed" in out
    assert "| bytes down per round per client" in out and "MiB |" in out
    assert "| messages by type | train: 1 |" in out
    row = next(line for line in out.splitlines() if "process start to reply sent" in line)
    first = row.split("|")[2].strip()
    assert float(first) > 0  # measured, not 'n/a'
    assert "phases not found" not in out


@pytest.mark.e2e
def test_orchestration_benchmark_smoke() -> None:
    """The orchestration benchmark runs a real federation and reports every measure."""
    out = _run(
        "simulations.bench.orchestration", "--clients", "2", "--rounds", "2",
        "--repeats", "1",
    )  # fmt: skip
    for measure in ("launch_to_round_1", "serverapp_to_round_1", "orchestration_per_round"):
        assert f"| {measure} |" in out


@pytest.mark.e2e
def test_scale_benchmark_smoke() -> None:
    """The scale benchmark's checks pass on a small federation (20 nodes, 5 per round)."""
    out = _run(
        "simulations.bench.scale", "--clients", "20", "--per-round", "5",
        "--rounds", "1", "--dataset", "digits",
    )  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("| privfed | 20 |"))
    assert "| [5] | True |" in row and "GB |" in row and "accuracy 0." in row
    rss, pss = (float(x) for x in re.findall(r"\| (\d+\.\d+) GB", row))
    assert rss > pss > 0.2  # the whole tree sampled: Ray's workers hold torch
    assert re.search(r"^memory sampler: \d+\.\d CPU-s over \d+ s$", out, re.M)
