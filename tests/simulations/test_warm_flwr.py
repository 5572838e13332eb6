"""A ``flwr`` started ahead of its submission runs Flower's own CLI with the command
line it is handed, and submits nothing when released unused."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from simulations.launch.flwr_run import FLWR, SubmittedRun
from simulations.launch.warm_flwr import WarmFlwr, WarmFlwrPool


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}


def test_a_warm_flwr_runs_the_command_line_it_is_given(tmp_path: Path) -> None:
    warm = WarmFlwr(_env(), tmp_path)
    proc = warm.go(["--version"])
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert out.strip() == "Flower version: " + __import__("flwr").__version__
    warm.release()  # used: nothing to release
    assert warm.used


def test_released_unused_it_exits_having_run_nothing(tmp_path: Path) -> None:
    warm = WarmFlwr(_env(), tmp_path)
    warm.release()
    assert warm.popen.returncode == 0


def test_a_malformed_command_line_is_refused(tmp_path: Path) -> None:
    warm = WarmFlwr(_env(), tmp_path)
    assert warm.popen.stdin is not None
    warm.popen.stdin.write('{"run": 1}\n')
    warm.popen.stdin.close()
    assert warm.popen.stdout is not None
    out = warm.popen.stdout.read()
    assert warm.popen.wait(timeout=60) == 2 and "expected a JSON list of strings" in out


def test_the_pool_keeps_one_ready_and_starts_no_more_than_submissions(
    tmp_path: Path,
) -> None:
    pool = WarmFlwrPool(_env(), tmp_path, submissions=2, spare=1)
    first = pool.take()  # started with the pool; a second one starts now
    second = pool.take()
    assert first is not second and not pool._ready  # none beyond the two planned
    extra = pool.take()  # a submission beyond the plan still gets one
    for warm in (first, second, extra):
        warm.release()
        assert warm.popen.returncode == 0
    spare = WarmFlwrPool(_env(), tmp_path, submissions=3, spare=2)
    ready = list(spare._ready)
    assert len(ready) == 2
    spare.close()
    assert all(w.popen.returncode == 0 for w in ready) and not spare._ready


def test_a_submitted_run_streams_a_warm_flwr_and_refuses_another_command(
    tmp_path: Path,
) -> None:
    env = _env()
    out = io.StringIO()
    run = SubmittedRun(
        [str(FLWR), "--version"], env, tmp_path, "x", out, WarmFlwr(env, tmp_path)
    )
    end = run.stream(deadline=float("inf"))
    run.close()
    assert end.outcome is None and "exited with code 0" in end.reason
    assert "Flower version: " in out.getvalue()
    for argv, cwd in (
        ([sys.executable, "-c", "pass"], tmp_path),
        ([str(FLWR), "--version"], tmp_path / "elsewhere"),
    ):
        other = WarmFlwr(env, tmp_path)
        with pytest.raises(ValueError, match="runs only `flwr` in its own env and cwd"):
            SubmittedRun(argv, env, cwd, "x", out, other)
        assert other.popen.returncode == 0  # released, having run nothing
