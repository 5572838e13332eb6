"""A private round is one message per node: no federated evaluation by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import RunConfig
from simulations.deploy import parse_args
from simulations.launch.options import build_overrides, pyproject_defaults
from simulations.presets import PRESETS


@pytest.mark.parametrize("preset", [None, *sorted(PRESETS)])
def test_deploy_sends_no_evaluate_messages_by_default(
    tmp_path: Path, preset: str | None
) -> None:
    """``make deploy`` (and each preset) runs private with ``fraction-evaluate = 0``:
    the server's central evaluation scores the model, nodes only train."""
    argv = ["--results-dir", str(tmp_path / "run")]
    if preset is not None:
        clients = min(PRESETS[preset].clients or 10, 10)  # 'sites' presets: one per site
        argv += ["--preset", preset, "--clients", str(clients), "--rounds", "1"]
    overrides = build_overrides(parse_args(argv))
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **overrides})
    assert cfg.is_private or cfg.is_client_level
    assert cfg.fraction_evaluate == 0.0
