"""Pre-installing the FAB: runs submitted side by side never see a half-installed app."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab
from flwr.common.config import get_project_dir

from simulations.launch.flower_env import install_app, stage_app
from simulations.launch.options import APP_DIR


def _staged(tmp_path: Path) -> Path:
    return stage_app(APP_DIR, tmp_path / "stage")


def test_flower_uses_a_folder_another_installer_has_only_begun(tmp_path: Path) -> None:
    """The race this works around: a second installer (a run submitted beside the
    first) finds the folder created but not yet filled, and uses it as it is. If
    Flower makes its install atomic, this fails and the workaround can go."""
    fab = build_fab_from_disk(_staged(tmp_path))
    home = tmp_path / "home"
    first = install_from_fab(fab, install_dir=home, skip_prompt=True)
    for item in first.iterdir():  # as the first installer left it mid-copy
        if item.is_file():
            item.unlink()
    again = install_from_fab(fab, install_dir=home, skip_prompt=True)
    assert again == first and not (again / "pyproject.toml").exists()


def test_the_app_is_installed_where_flower_s_processes_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = _staged(tmp_path)
    homes = [tmp_path / "superlink-home", tmp_path / "supernode-0-home"]
    installed = install_app(staged, homes)
    fab_hash = hashlib.sha256(build_fab_from_disk(staged)).hexdigest()
    for home, folder in zip(homes, installed, strict=True):
        project = tomllib.loads((folder / "pyproject.toml").read_text())  # rewritten
        assert project["project"]["name"] == "privfed"  # by the FAB build; complete
        for package in ("common", "client", "server"):
            assert (folder / package).is_dir(), package
        # The folder a ServerApp or ClientApp with FLWR_HOME=home resolves.
        monkeypatch.setenv("FLWR_HOME", str(home))
        assert folder == get_project_dir("privfed/privfed", "0.1.0", fab_hash)


def test_a_second_install_keeps_the_complete_folder(tmp_path: Path) -> None:
    staged = _staged(tmp_path)
    home = tmp_path / "home"
    (folder,) = install_app(staged, [home])
    marker = (folder / "pyproject.toml").stat().st_mtime_ns
    assert install_app(staged, [home]) == [folder]
    assert (folder / "pyproject.toml").stat().st_mtime_ns == marker
