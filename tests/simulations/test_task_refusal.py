"""A task module the clients could not use is refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.process_watch import run_watched


def test_a_task_lacking_a_part_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--task module:attribute`` whose Task lacks its model: exit 2, no process."""
    (tmp_path / "half_task.py").write_text(
        "from common.tasks.task import AffinePreprocessing, Task\n"
        "TASK = Task(name='half', class_labels=('a', 'b'), read_raw=print,\n"
        "            preprocessing=AffinePreprocessing(raw_shape=(2,)))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    code, out, watch = run_watched(
        ["--task", "half_task:TASK", "--results-dir", str(tmp_path / "r")], timeout=120
    )
    assert code == 2, out[-3000:]
    assert "run config key 'task'" in out and "'half_task'" in out and "'model'" in out
    assert not watch.pids
    assert not (tmp_path / "r").exists()
