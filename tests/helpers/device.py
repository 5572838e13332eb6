"""An edge device in a test: its owner's policy, its own data file, its context."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tomli_w
from flwr.app import Context, RecordDict

from client.privacy.policy import POLICY_FILE
from common.config import RunConfig

PREDICT_THEN_CHECK_IMPORTS = """
import runpy, sys
sys.argv = ["predict", *sys.argv[1:]]
try:
    runpy.run_module("client.predict", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    assert not exc.code, exc.code
bad = [m for m in sys.modules if m.split(".")[0] in ("common", "server", "opacus", "flwr")]
assert not bad, bad
"""


# The public record count test devices plan from (what N ≤ 512 rounded up to a power
# of two gave before plans stopped depending on N); tests of the refusal pass None.
PLANNING_RECORDS = 512


def write_policy(state: Path, **keys: object) -> Path:
    """The device owner's privacy-policy.toml (defaults: budget 50, δ 1e-5, ledger
    out, planning-records 512); a key given as ``None`` is left out."""
    policy = {"epsilon-budget": 50.0, "delta": 1e-5, "release-ledger": True,
              "planning-records": PLANNING_RECORDS, **keys}  # fmt: skip
    policy = {key: value for key, value in policy.items() if value is not None}
    state.mkdir(parents=True, exist_ok=True)
    (state / POLICY_FILE).write_text(tomli_w.dumps(policy))
    return state


def digits_npz(path: Path, n: int, offset: int = 0) -> Path:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=bunch.images[offset : offset + n].astype(np.uint8),
             y=bunch.target[offset : offset + n])  # fmt: skip
    return path


def device_context(cfg: RunConfig, data: Path, state: Path, run_id: int = 7) -> Context:
    node = {"data-path": str(data), "state-dir": str(state)}
    return Context(run_id=run_id, node_id=9, node_config=node, state=RecordDict(),
                   run_config=cfg.to_run_config())  # fmt: skip
