"""The front proxy's prerequisites: a secure deployment without nginx stops at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations import deploy
from simulations.deployment import front_proxy
from simulations.launch.processes import descendants


def test_missing_nginx_exits_2_naming_it_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without nginx the deployment is refused (exit 2, how to install it), with no
    process started and no certificate made; --insecure remains for debugging."""
    monkeypatch.setattr(front_proxy, "NGINX_CANDIDATES", ("privfed-no-such-nginx",))
    before = {p.pid for p in descendants()}
    code = deploy.main(["--clients", "1", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nginx not found" in err and "apt-get install nginx" in err
    assert "--insecure" in err
    assert not (tmp_path / "r" / "certs").exists()
    assert {p.pid for p in descendants()} <= before
