"""A ClientApp message imports only what it uses, and the light paths equal the heavy ones.

Every message on a SuperNode runs in a fresh process, so an import is paid per
message: Opacus' engine 1.6 CPU-s, ``torch._dynamo`` (any ``torch.optim`` object)
1.1, scikit-learn's metrics 0.7, flwr-datasets (matplotlib) 2+. The subprocess
tests fail when one of them comes back; the others check that what replaced them
(Opacus' RDP file run on its own, torch's functional SGD) gives Opacus' and
torch's results exactly.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulations.bench.clientapp_probe import HEAVY_MODULES

REPO = Path(__file__).resolve().parents[2]
# Heavy modules a train message in grad-sample mode "direct" does not use: the
# probe's list (what bench_deployment reports), and in this mode none of Opacus.
HEAVY = (*HEAVY_MODULES, "opacus", "torch._dynamo")
TRAIN_TWICE = """
import json, sys
from flwr.app import ArrayRecord
import client.app as client_app
from common.config import RunConfig
from common.tasks.models import build_model
from common.wire.reply import TrainReport
from tests.helpers.messages import make_context, train_message

cfg = RunConfig(num_rounds=3, results_dir=sys.argv[1])
arrays = ArrayRecord(build_model("digits", seed=0).state_dict())
round_ = int(sys.argv[2])
reply = client_app.train(train_message(arrays, round_), make_context(cfg, 0, 4))
status = TrainReport.from_content(reply.content).status.value
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def _loaded(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_importing_the_client_app_loads_no_heavy_module() -> None:
    """``import client.app`` (what Flower does per message) pulls in none of HEAVY,
    nor torch: the training module is imported by the messages that train."""
    loaded = _loaded("import json, sys, client.app; print(json.dumps(sorted(sys.modules)))")
    assert "flwr.clientapp" in loaded  # the check sees real imports
    assert _heavy(loaded) == [] and "torch" not in loaded
    assert "client.train_evaluate" not in loaded


SECAGG_STAGES_WITHOUT_TORCH = """
import json, sys


class NoTorch:  # any import of torch fails the message that makes it
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} imported by a secure-aggregation stage")


sys.meta_path.insert(0, NoTorch())
from flwr.app import ConfigRecord, RecordDict
import client.app as client_app
from common.config import RunConfig
from common.secure_aggregation.protocol import SECAGG_KEY, Stage
from common.wire.reply import TrainReport
from tests.helpers.messages import make_context, make_message

cfg = RunConfig(
    privacy_mode="client", secure_aggregation=True, client_sampling_rate=1.0,
    target_epsilon=0.0, noise_multiplier=1.0, delta=1e-3, results_dir=sys.argv[1],
)
context = make_context(cfg, 0, 3, node_id=100)
out = {}
for stage in (Stage.SHARE_KEYS, Stage.CONSISTENCY, Stage.UNMASK):
    record = ConfigRecord({"stage": stage.value, "server-round": 1})
    msg = make_message(RecordDict({SECAGG_KEY: record}), stage.message_type, 100)
    report = TrainReport.from_content(client_app.app(msg, context).content)
    out[stage.value] = [report.status.value, report.reason]
print(json.dumps({"stages": out, "modules": sorted(sys.modules)}))
"""


def test_secure_aggregation_key_and_check_stages_never_import_torch(tmp_path: Path) -> None:
    """A fresh process answering a key-exchange, consistency or unmask message (three
    of a secure-aggregation round's five) runs the node's policy, the run config and
    the stage's own checks without torch (about 2 CPU-s a message): here each
    refuses (no identity, a malformed request) with torch unimportable."""
    loaded = _loaded(SECAGG_STAGES_WITHOUT_TORCH, str(tmp_path))
    stages = loaded["stages"]
    assert set(stages) == {"secagg_share_keys", "secagg_consistency", "secagg_unmask"}
    for status, reason in stages.values():
        assert status == "policy-refused" and reason.startswith("secure aggregation: ")
        assert "torch" not in reason
    assert "no usable node identity" in stages["secagg_share_keys"][1]
    assert "'signers' must be a list of ints" in stages["secagg_unmask"][1]
    assert "client.secure_aggregation.stages" in loaded["modules"]
    assert "torch" not in loaded["modules"] and _heavy(loaded["modules"]) == []


def test_a_cached_train_message_loads_no_heavy_module(tmp_path: Path) -> None:
    """A whole DP-SGD train message (direct mode, RDP, σ calibrated) in a fresh
    process, once the partition's shard is cached, imports none of HEAVY; nor does
    the first, which reads and splits the digits (with numpy, not scikit-learn:
    common/data/stratified_split.py) and caches the shard."""
    first = _loaded(TRAIN_TWICE, str(tmp_path), "1")
    assert first["status"] == "trained"
    assert "common.tasks.digits" in first["modules"]  # the first message read the data
    assert _heavy(first["modules"]) == []
    assert list(tmp_path.rglob("shard-cache/*/manifest.json"))  # and cached its shard
    second = _loaded(TRAIN_TWICE, str(tmp_path), "2")
    assert second["status"] == "trained"
    assert _heavy(second["modules"]) == []


def test_rdp_analysis_is_opacus_own_file_run_on_its_own() -> None:
    """The module run by file is the installed Opacus' analysis, not a copy, and
    is not registered as (or under) the opacus package."""
    import opacus.accountants.analysis.rdp as opacus_rdp

    from common.privacy.accountants import opacus_rdp as ours

    assert ours.analysis_file() == Path(opacus_rdp.__file__)
    module = ours.load_analysis_file()
    assert module is not opacus_rdp and not module.__name__.startswith("opacus")
    assert Path(module.__file__) == Path(opacus_rdp.__file__)


def test_rdp_orders_are_opacus_default_alphas() -> None:
    """RDP_ORDERS, repeated to avoid the package init, equal Opacus' own."""
    from opacus.accountants import RDPAccountant

    from common.privacy.accountants.opacus_rdp import RDP_ORDERS

    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 1 / 19, 190)],
        [(0.7, 0.01, 5000), (1.3, 0.25, 40)],
        [(2.15, 2048 / 60000, 1170)],
        [(5.0, 1.0, 3)],
    ],
)
def test_epsilon_equals_opacus_rdp_accountant(history: list) -> None:
    """ε from the file-run analysis equals Opacus' RDPAccountant to the last bit."""
    from opacus.accountants import RDPAccountant

    from common.ledger.privacy_ledger import epsilon_of_history
    from common.privacy.accountants import opacus_rdp

    module = opacus_rdp.load_analysis_file()
    acc = RDPAccountant()
    acc.history = list(history)
    rdp = sum(
        module.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=opacus_rdp.RDP_ORDERS)
        for s, q, n in history
    )
    eps, _ = module.get_privacy_spent(orders=opacus_rdp.RDP_ORDERS, rdp=rdp, delta=1e-5)
    assert eps == acc.get_epsilon(delta=1e-5)
    assert epsilon_of_history(history, 1e-5, "rdp") == pytest.approx(eps, rel=1e-12)


@pytest.mark.parametrize(
    ("target", "delta", "rate", "steps", "tolerance"),
    [
        (8.0, 1e-5, 1 / 5, 25, 0.01),
        (3.0, 1e-5, 1 / 12, 240, 0.006),
        (0.5, 1e-6, 0.01, 10_000, 0.001),
        (200.0, 1e-5, 0.5, 2, 0.01),  # σ = 20 at once: the integer start of the search
    ],
)
def test_calibrated_sigma_equals_opacus_get_noise_multiplier(
    target: float, delta: float, rate: float, steps: int, tolerance: float
) -> None:
    """The bisection run without the package init gives Opacus' σ exactly."""
    from opacus.accountants.utils import get_noise_multiplier

    from common.privacy.accountants.opacus_rdp import rdp_noise_multiplier
    from common.privacy.dp_sgd_plan import calibrate_gaussian_noise_multiplier

    theirs = get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=rate, steps=steps,
        accountant="rdp", epsilon_tolerance=tolerance,
    )  # fmt: skip
    assert rdp_noise_multiplier(target, delta, rate, steps, tolerance) == theirs
    if tolerance == min(0.01, 0.002 * target):
        assert (
            calibrate_gaussian_noise_multiplier(target, delta, rate, steps, "rdp") == theirs
        )


def test_a_budget_no_sigma_reaches_fails_as_opacus_does() -> None:
    """A target no σ up to Opacus' MAX_SIGMA meets fails with Opacus' error."""
    from opacus.accountants.utils import get_noise_multiplier

    from common.privacy.accountants.opacus_rdp import rdp_noise_multiplier

    with pytest.raises(ValueError, match="too low") as theirs:
        get_noise_multiplier(
            target_epsilon=1e-9, target_delta=1e-12, sample_rate=1.0, steps=10**6
        )
    with pytest.raises(ValueError, match="too low") as ours:
        rdp_noise_multiplier(1e-9, 1e-12, 1.0, 10**6)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_plain_sgd_updates_as_torch_sgd(momentum: float) -> None:
    """PlainSGD leaves the same parameters as torch.optim.SGD after several steps,
    including a parameter that has no gradient in some steps."""
    from client.training.sgd import PlainSGD

    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    models = [first, copy.deepcopy(first)]
    ours = PlainSGD(models[0].parameters(), lr=0.3, momentum=momentum)
    theirs = torch.optim.SGD(models[1].parameters(), lr=0.3, momentum=momentum)
    for step in range(5):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        for model, opt in ((models[0], ours), (models[1], theirs)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:  # the first layer sits this step out
                model[0].weight.grad = None
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
