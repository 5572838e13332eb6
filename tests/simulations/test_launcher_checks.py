"""Launchers: every bad run key or option exits 2, naming it, before any process starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import simulations.deploy as deploy
import simulations.run as run
import simulations.sweep as sweep
from simulations.launch.options import build_overrides


class Started(AssertionError):
    """A launcher went on to start processes after a bad option."""


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a launcher gets as far as starting a SuperLink or a subprocess."""

    def tripwire(*_args: Any, **_kwargs: Any) -> None:
        raise Started("a process was started")

    monkeypatch.setattr(run, "simulation_superlink", tripwire)
    monkeypatch.setattr(run, "become_subreaper", tripwire)
    monkeypatch.setattr(deploy, "LocalDeployment", tripwire)
    monkeypatch.setattr(deploy, "become_subreaper", tripwire)
    monkeypatch.setattr(sweep, "simulation_superlink", tripwire)
    monkeypatch.setattr(sweep, "become_subreaper", tripwire)


def _exit_code(main: Any, argv: list[str]) -> int:
    try:
        return int(main(argv))
    except SystemExit as exc:  # argparse refuses an option with exit 2
        return int(exc.code or 0)


# (options, what the message must name); each is refused by simulations.run.
BAD_RUNS: list[tuple[list[str], str]] = [
    *(
        (["--set", f"{key}=inf"], f"'{key}'")
        for key in (
            "noise-multiplier",
            "target-epsilon",
            "max-grad-norm",
            "dirichlet-alpha",
            "round-timeout",
        )
    ),
    (["--set", "delta=nan"], "'delta'"),
    (["--set", "learning-rate=-inf"], "'learning-rate'"),
    (["--set", "results-dir=5"], "'results-dir'"),
    (["--set", "batchsize=32"], "'batchsize'"),
    (["--set", "min-available-nodes=5"], "'min-available-nodes'"),
    (["--set", "results-dir='/elsewhere'"], "'results-dir'"),  # vs --results-dir
    (["--target-epsilon", "1e-9"], "'target-epsilon'"),
    (  # a sum of 100 uploads with noise does not fit in 8 bits
        [
            "--clients",
            "100",
            "--privacy-mode",
            "client",
            "--set",
            "secure-aggregation=true",
            "--set",
            "client-sampling-rate=1.0",
            "--set",
            "secagg-modulus-range=256",
        ],
        "'secagg-modulus-range'",
    ),
    (["--set", "secure-aggregation=true"], "'secure-aggregation'"),  # sample mode
    (["--noise-multiplier", "0.5", "--epsilon-budget", "0.01"], "'epsilon-budget'"),
    (["--target-epsilon", "8", "--epsilon-budget", "1e-6"], "'epsilon-budget'"),
    (["--delta", "0.01"], "'delta'"),  # 1/N is about 1/479 for 3 digits shards
    (["--partitioner", "pathological"], "'classes-per-client'"),  # 3 + 2 - 1 < 10
    (["--clients", "2000"], "--clients 2000"),  # digits has 1,437 training records
    (["--client-cpus", "0"], "--client-cpus"),
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--timeout", "0"], "--timeout"),
    (["--clients", "0"], "--clients"),
    (["--ray-address", "ray://head:10001"], "--ray-address"),  # Ray Client: not this
    (["--ray-address", "head"], "--ray-address"),
    (["--ray-address", "head:0"], "--ray-address"),
]


@pytest.mark.parametrize(("options", "named"), BAD_RUNS, ids=lambda v: str(v))
def test_simulation_refuses_before_starting(
    options: list[str],
    named: str,
    tmp_path: Path,
    no_processes: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 2 naming the key or option; no process and no results folder."""
    results = tmp_path / "r"
    argv = ["--clients", "3", "--rounds", "2", "--results-dir", str(results), *options]
    assert _exit_code(run.main, argv) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not results.exists()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--set", "results-dir=5"], "'results-dir'"),
        (["--set", "round-timeout=inf"], "'round-timeout'"),
        (["--target-epsilon", "1e-9"], "'target-epsilon'"),
        (["--partitioner", "pathological"], "'classes-per-client'"),
        (["--timeout", "-1"], "--timeout"),
        (["--nodes", "0"], "--nodes"),
        (["--server-san", "https://host.example.org"], "server SAN"),
        (["--server-san", "*.example.org"], "no wildcards"),
        (["--server-san", "10.0.0"], "server SAN '10.0.0'"),
        (["--insecure", "--server-san", "host.example.org"], "drop --insecure"),
    ],
    ids=lambda v: str(v),
)
def test_deployment_refuses_before_starting(
    options: list[str],
    named: str,
    tmp_path: Path,
    no_processes: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The deployment launcher shares the checks: exit 2, nothing started or written."""
    results = tmp_path / "r"
    argv = ["--clients", "3", "--rounds", "2", "--results-dir", str(results), *options]
    assert _exit_code(deploy.main, argv) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not results.exists()  # no node policy, certificate or summary written


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--set", "target-epsilon=inf"], "'target-epsilon'"),
        (["--epsilons", "1e-9"], "'target-epsilon'"),
        (["--clients", "0"], "--clients"),
    ],
    ids=lambda v: str(v),
)
def test_sweep_refuses_before_any_point_starts(
    options: list[str],
    named: str,
    tmp_path: Path,
    no_processes: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A sweep checks every grid point first: exit 2, no federation, no sweep folder."""
    argv = ["--partitioners", "iid", "--clients", "2", "--rounds", "1",
            "--no-reference", "--out", str(tmp_path / "sweep"), *options]  # fmt: skip
    assert _exit_code(sweep.main, argv) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not (tmp_path / "sweep").exists()


def test_an_inherited_ray_address_is_checked_before_starting(
    tmp_path: Path,
    no_processes: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """$RAY_ADDRESS (Ray's own variable) is the default of --ray-address: a bad one
    exits 2 naming it; `local` and an explicit option pass the checks."""
    argv = ["--clients", "3", "--rounds", "2", "--results-dir", str(tmp_path / "r")]
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert _exit_code(run.main, argv) == 2
    assert "$RAY_ADDRESS='auto'" in capsys.readouterr().err
    with pytest.raises(Started):
        run.main([*argv, "--ray-address", "127.0.0.1:6379"])
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(Started):
        run.main(argv)


def test_a_valid_sweep_gets_past_the_checks(tmp_path: Path, no_processes: None) -> None:
    """The sweep's tripwire (its one SuperLink) fires for good options."""
    argv = ["--epsilons", "8", "--partitioners", "iid", "--clients", "2", "--rounds",
            "1", "--no-reference", "--out", str(tmp_path / "sweep")]  # fmt: skip
    with pytest.raises(Started):
        sweep.main(argv)


def test_set_results_dir_is_honoured(tmp_path: Path) -> None:
    """--set results-dir='PATH' is where the run goes (it used to be ignored)."""
    target = tmp_path / "chosen"
    args = run.parse_args(["--clients", "2", "--set", f"results-dir='{target}'"])
    assert build_overrides(args)["results-dir"] == str(target.resolve())


def test_a_valid_run_gets_past_the_checks(tmp_path: Path, no_processes: None) -> None:
    """The tripwire above fires for good options (so the refusals above mean something)."""
    argv = ["--clients", "3", "--rounds", "2", "--results-dir", str(tmp_path / "r")]
    with pytest.raises(Started):
        run.main(argv)


def test_a_client_level_sweep_runs_client_level_points_and_a_same_cohort_reference(
    tmp_path: Path,
) -> None:
    """`--privacy-mode client`: private points ask for it; references keep the cohort."""
    args = sweep.parse_args(
        [
            "--privacy-mode",
            "client",
            "--epsilons",
            "3",
            "--partitioners",
            "iid",
            "--set",
            "client-sampling-rate=0.2",
            "--out",
            str(tmp_path),
        ]  # fmt: skip
    )
    private, reference = sweep.grid(args)
    private_argv = sweep.point_options(private, args, tmp_path)
    reference_argv = sweep.point_options(reference, args, tmp_path)
    assert private_argv[private_argv.index("--privacy-mode") + 1] == "client"
    assert reference_argv[reference_argv.index("--privacy-mode") + 1] == "none"
    assert "fraction-train=0.2" in reference_argv


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--set", "delta=0.6"], "'delta'"),  # not below 1/n for n = 2 clients
        (["--set", 'clipping="adaptive"'], "'clipped-count-stddev'"),  # 2σ_b <= z
    ],
    ids=["delta", "count-noise"],
)
def test_client_level_keys_that_need_n_are_refused_before_start(
    options: list[str],
    named: str,
    tmp_path: Path,
    no_processes: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """δ ≥ 1/n and a count noise too small to split z exit 2 before any process."""
    argv = ["--privacy-mode", "client", "--clients", "2", "--rounds", "1",
            "--results-dir", str(tmp_path / "run"), *options]  # fmt: skip
    assert _exit_code(run.main, argv) == 2
    err = capsys.readouterr().err
    assert named in err, err
