"""An active server that splits a round into views, or replans it per cohort.

In a sparse SecAgg+ graph (a cohort above k) a holder knows only its neighbours, and
the server draws the graph. It can show one part of the cohort an uploader set that
names the target X (to rebuild X's mask seed) and another part a set without X's
partners (to rebuild their mask keys). The test plays that server with real
ClientApps on a graph drawn for the attack. It fails for two independent reasons,
each tested without the other: a holder reveals only when t of its own neighbours
signed its set (a partner's k < 2t holders cannot serve both views), and more than
half the participants must sign one set. A node sets up each round once, so it
cannot appear twice, in two views. The plan's m and scale are the run's, fixed
from q and n, whatever cohort is sampled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord

import client.secure_aggregation.verification as verification
import server.secure_aggregation.strategy as secagg_strategy
from common.secure_aggregation.consistency import (
    ConsistencyInstruction,
    UnmaskInstruction,
    signature_from_record,
)
from common.secure_aggregation.distributed_dp import QuantisationPlan
from common.secure_aggregation.plan import plan_for_run, public_minimum
from common.secure_aggregation.protocol import SECAGG_KEY, RevealedShares, Stage
from common.tasks.models import build_model, count_parameters
from common.wire.reply import TrainReport
from common.wire.reply_fields import Status
from server.app import make_strategy
from server.secure_aggregation.layout import Layout
from simulations.launch.in_process_federation import InProcessGrid, federation
from tests.helpers.secure_aggregation import (
    FIRST,
    NODES,
    Protocol,
    ask,
    run_to_upload,
    secagg_cfg,
    server_identity,
    use_dealer,
)

SPARSE = 8  # X, its partners J1..J4 and three holders B1..B3: every node shares with 5


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    server_identity(monkeypatch)


def _drawn_graph() -> Layout:
    """The graph a malicious server draws (it chooses every node's neighbours): X
    shares with J1..J4; each J shares with X and B1..B3; each B with J1..J4. Every
    node has k = 5 holders (itself included), t = 3, m = 3."""
    x, js, bs = FIRST, [FIRST + i for i in (1, 2, 3, 4)], [FIRST + i for i in (5, 6, 7)]
    neighbours = {x: (x, *js)}
    neighbours |= {j: (j, x, *bs) for j in js}
    neighbours |= {b: (b, *js) for b in bs}
    return Layout({n: tuple(sorted(v)) for n, v in neighbours.items()}, 3, 3)


def _split_views(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, int], list[str]]:
    """Run to upload on the drawn graph, then split the round: X, J1, J2 are shown
    U_A = everyone (so they reveal X's mask seed); B1..B3 are shown U_B = {B1, B2,
    B3} (so, J1..J4 "dropped", they reveal the J's mask keys). With X's seed and
    every partner's mask key the server removes all of X's masks: X's upload alone.
    Returns the shares the server got of each secret, and the refusals."""
    use_dealer(tmp_path / "dealer", monkeypatch, partitions=SPARSE)
    cfg = secagg_cfg(
        tmp_path, min_available_nodes=SPARSE, secagg_num_shares=5,
        secagg_min_contributors=0.3,  # m = 3: U_B gets signed
    )  # fmt: skip
    protocol = Protocol(cfg, nodes=SPARSE)
    protocol.layout = _drawn_graph()
    run_to_upload(protocol)
    x, js, bs = FIRST, [FIRST + i for i in (1, 2, 3, 4)], [FIRST + i for i in (5, 6, 7)]
    everyone = tuple(sorted(protocol.layout.neighbours))
    views = {n: everyone for n in (x, js[0], js[1])} | {b: tuple(bs) for b in bs}
    signatures: dict[tuple[int, ...], dict[int, bytes]] = {}
    for node, shown in views.items():
        told = ConsistencyInstruction(1, shown).to_record()
        reply = ask(protocol, node, Stage.CONSISTENCY, told)
        record = reply.content.config_records[SECAGG_KEY]
        signatures.setdefault(shown, {})[node] = signature_from_record(record)
    got = {"seed of X": 0} | {f"mask key of {j}": 0 for j in js}
    refusals = []
    for node, shown in views.items():
        record = UnmaskInstruction(1, shown, signatures[shown]).to_record()
        reply = ask(protocol, node, Stage.UNMASK, record)
        if SECAGG_KEY not in reply.content.config_records:
            report = TrainReport.from_content(reply.content)
            assert report.status is Status.POLICY_REFUSED
            refusals.append(str(report.reason))
            continue
        revealed = RevealedShares.from_record(reply.content.config_records[SECAGG_KEY])
        got["seed of X"] += x in revealed.seed_shares
        for j in set(js) & set(revealed.key_shares):
            got[f"mask key of {j}"] += 1
    return got, refusals


@pytest.mark.parametrize(
    ("neighbour_rule", "majority_rule"),
    [(False, False), (True, False), (False, True), (True, True)],
)
def test_split_views_on_a_server_drawn_graph(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    neighbour_rule: bool,
    majority_rule: bool,
) -> None:
    """With both rules off, the attack gets t = 3 shares of every secret it needs:
    X's upload would be unmasked alone (this is what the test guards against).
    Each rule alone stops it: J1 and J2 see only 2 of their neighbours (themselves
    and X) sign U_A, so X's seed gets one share; and neither view is signed by more
    than half of the 8 participants."""
    if not neighbour_rule:
        monkeypatch.setattr(verification, "neighbour_quorum", lambda threshold: 0)
    if not majority_rule:
        monkeypatch.setattr(verification, "global_quorum", lambda participants: 0)
    got, refusals = _split_views(tmp_path, monkeypatch)
    if not (neighbour_rule or majority_rule):
        assert min(got.values()) >= 3, got
        return
    assert min(got.values()) < 3, got  # some secret X's masks need stays hidden
    if neighbour_rule:
        assert got["seed of X"] <= 1, got
        assert sum("2 of this node's neighbours signed" in r for r in refusals) == 2
    if majority_rule:
        assert not any(got.values()) and len(refusals) == 6, (got, refusals)
        majority = sum("more than half of the 8 participants" in r for r in refusals)
        assert majority == (1 if neighbour_rule else 6), refusals


def test_a_node_sets_up_each_round_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server restarts round 1 after every node uploaded, to get a second
    incarnation of each (fresh keys, a second signature) for a second view. Every
    node refuses, naming the round."""
    use_dealer(tmp_path / "dealer", monkeypatch)
    protocol = Protocol(secagg_cfg(tmp_path))
    run_to_upload(protocol)
    result = protocol.run()
    assert result.total is None
    reasons = [str(TrainReport.from_content(m.content).reason) for m in result.answers]
    assert len(reasons) == NODES
    assert all("already set up round 1" in r for r in reasons), reasons


def test_m_and_the_scale_are_the_runs_whatever_cohort_is_sampled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Poisson cohorts of 5, 4 and 2 from n = 5 at q = 0.6 (expected 3): every round
    is sent the same plan (m = 3, one scale), planned from q and n; the cohort of 2
    releases nothing and nothing is sent."""
    use_dealer(tmp_path / "dealer", monkeypatch)
    cfg = secagg_cfg(tmp_path, client_sampling_rate=0.6, secagg_min_contributors=1.0)
    contexts = federation(cfg, range(NODES), NODES, first_node=FIRST)
    grid = InProcessGrid(contexts)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True)
    strategy = make_strategy(cfg, out, 1)
    strategy.start_run(grid.get_node_ids())
    nodes = sorted(grid.get_node_ids())
    cohorts = iter([nodes, nodes[:4], nodes[:2]])
    monkeypatch.setattr(secagg_strategy, "poisson_cohort", lambda *a: next(cohorts))
    plans: list[QuantisationPlan] = []
    real_round = secagg_strategy.SecAggRound

    class Recording(real_round):  # type: ignore[misc,valid-type]
        def __init__(
            self, grid: Any, server_round: int, layout: Any, plan: Any, *a: Any, **k: Any
        ) -> None:
            plans.append(plan)
            super().__init__(grid, server_round, layout, plan, *a, **k)

    monkeypatch.setattr(secagg_strategy, "SecAggRound", Recording)
    arrays = ArrayRecord(build_model(cfg.task, seed=0).state_dict())
    steps = [strategy.train_round(r, arrays, grid, 0.3) for r in (1, 2, 3)]
    assert [s.arrays is not None for s in steps] == [True, True, False]
    assert len(plans) == 2 and plans[0] == plans[1]
    dim = count_parameters(build_model(cfg.task))
    assert plans[0] == plan_for_run(cfg, dim, strategy.noise_multiplier, NODES)
    assert plans[0].min_contributors == public_minimum(cfg, 3) == 3
    assert "below the run's minimum of 3 uploads" in strategy.round_facts["failure"]
    ledger = json.loads((out / "federation-ledger.json").read_text())
    assert [r["contributors"] for r in ledger["rounds"]] == [5, 4]
