"""tools/install_venv.py carries pip's settings over to uv, or leaves the job to pip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tools.install_venv import pip_settings, uv_options

PYTHON = Path(sys.executable)


def test_pips_effective_settings_are_read_as_pip_resolves_them(tmp_path: Path) -> None:
    """A config file and a PIP_ variable: both seen, the variable winning, and a
    file's [install] section over its [global] one, whatever order pip prints."""
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nfind-links = /from/file\nextra-index-url = a b\nindex-url = g\n"
        "[install]\nindex-url = i\n[download]\nno-index = true\n"
    )
    env = {**os.environ, "PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": "/from/env"}
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys; from tools.install_venv import pip_settings; "
         "print(pip_settings(__import__('pathlib').Path(sys.executable)))"],
        env=env, capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    settings = eval(done.stdout)  # noqa: S307 - a dict repr this test printed
    assert settings["find-links"] == "/from/env"
    assert settings["extra-index-url"] == "a b"
    assert settings["index-url"] == "i"  # [install] over [global]
    assert "no-index" not in settings  # another command's section
    assert pip_settings(PYTHON) is not None


def test_each_setting_becomes_uvs_option() -> None:
    args, env = uv_options({
        "index-url": "https://mirror/simple", "extra-index-url": "file:///a file:///b",
        "find-links": "/w1 /w2", "constraint": "/etc/site.txt", "no-index": "false",
        "trusted-host": "mirror", "cert": "/ca.pem", "default-timeout": "180",
        "disable-pip-version-check": "1",
    })  # fmt: skip
    assert args == [
        "--index-strategy", "unsafe-best-match",
        "--index-url", "https://mirror/simple",
        "--extra-index-url", "file:///a", "--extra-index-url", "file:///b",
        "--find-links", "/w1", "--find-links", "/w2",
        "--constraint", "/etc/site.txt",
        "--allow-insecure-host", "mirror",
    ]  # fmt: skip
    assert env == {"SSL_CERT_FILE": "/ca.pem", "UV_HTTP_TIMEOUT": "180"}
    assert "--no-index" in uv_options({"no-index": "true"})[0]


def test_a_setting_uv_is_not_told_about_leaves_the_install_to_pip() -> None:
    assert uv_options({"proxy": "http://proxy:3128"}) == (
        "pip setting 'proxy' has no uv translation here"
    )
