"""Two rounds of DP LoRA on a tiny random BERT, through the real ServerApp and ClientApps.

The whole ServerApp (``server.app.main``) runs in process over an InProcessGrid of
real ClientApp nodes (no Flower processes: the text path is what is under test,
the processes are tested elsewhere). Checked: only adapter and head arrays leave a
client, the adapters move, the frozen encoder a client trains on is bit for bit
the one on disk, every reported ε equals the node's ledger and dp-accounting on
its history, and the run ends exported (traced TorchScript and its int8 variant).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

pytest.importorskip("peft")
pytest.importorskip("transformers")

import client.train_evaluate as client_training  # noqa: E402
import server.app as server_app  # noqa: E402
from client.privacy.ledger_store import STATE_KEY  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.ledger.privacy_ledger import PrivacyLedger, epsilon_of_history  # noqa: E402
from common.tasks.models import build_run_model  # noqa: E402
from common.wire.reply import TrainReport  # noqa: E402
from simulations.launch.in_process_federation import (  # noqa: E402
    InProcessGrid,
    federation,
    weights,
)
from tests.helpers.independent_accounting import dp_accounting_rdp  # noqa: E402
from tests.helpers.tiny_text import (  # noqa: E402
    write_corpus,
    write_encoder,
    write_task_module,
)

NODES = 2
TINY_CODE: list[Path] = []  # the folder the fixture wrote the task module in


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tiny-text")
    TINY_CODE[:] = [root / "code"]
    return write_task_module(
        root / "code", write_encoder(root / "encoder"), write_corpus(root / "texts.csv")
    )


@pytest.fixture(autouse=True)
def _on_path(tiny_task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TINY_CODE[0]))
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)  # as the ServerApp process has


def _cfg(task: str, out: Path, **changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(
        task=task, num_rounds=2, grad_sample_mode="hooks", batch_size=16,
        learning_rate=0.5, target_epsilon=8.0, delta=1e-4, lora_rank=4,
        lora_alpha=8.0, lora_target_modules="query,value", update_compression="none",
        min_train_nodes=NODES, min_available_nodes=NODES, results_dir=str(out),
        reproducible_noise=False,
    )  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


def _server_context(cfg: RunConfig) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(),
        run_config=cfg.to_run_config(),
    )  # fmt: skip


class _Spy:
    """Records each reply's arrays and reports, and the frozen weights around training."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.replies: list[tuple[int, dict, TrainReport]] = []
        self.base_unchanged: list[bool] = []
        self.base_keys: set[str] = set()
        train = client_training.train_private

        def spying(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            frozen = {
                n: p.detach().clone()
                for n, p in model.named_parameters()
                if not p.requires_grad
            }
            self.base_keys = set(frozen)
            out = train(model, *args, **kwargs)
            self.base_unchanged.append(
                all(
                    torch.equal(p, frozen[n])
                    for n, p in model.named_parameters()
                    if n in frozen
                )
            )
            return out

        monkeypatch.setattr(client_training, "train_private", spying)

    def tamper(self, node: int) -> Any:
        def record(reply: Message, server_round: int) -> Message:
            report = TrainReport.from_content(reply.content)
            self.replies.append((node, weights(reply), report))
            return reply

        return record


def test_two_rounds_of_dp_lora_send_only_adapters(
    tiny_task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cfg = _cfg(tiny_task, out)
    spy = _Spy(monkeypatch)
    contexts = federation(cfg, range(NODES), NODES)
    grid = InProcessGrid(contexts, {node: spy.tamper(node) for node in contexts})
    server_app.main(grid, _server_context(cfg))  # type: ignore[arg-type]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("stop_reason")
    initial = build_run_model(cfg, seed=cfg.seed)
    exchanged = initial.exchanged_keys()
    assert all("lora_" in k or k.startswith("head.") for k in exchanged)
    assert len(spy.replies) == 2 * NODES
    for _node, arrays, report in spy.replies:
        assert list(arrays) == exchanged  # adapters and head: nothing of the encoder
        assert report.status.value == "trained"
    assert spy.base_keys and not spy.base_keys & set(exchanged)
    assert spy.base_unchanged == [True] * (2 * NODES)  # the frozen encoder never moves

    final = torch.load(out / "model.pt", weights_only=True)
    start = initial.state_dict()
    assert list(final) == exchanged
    lora_b = [k for k in exchanged if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(start[k]) == 0 for k in lora_b)
    assert all(torch.count_nonzero(final[k]) > 0 for k in lora_b)  # adapters moved

    for node, context in contexts.items():  # ε: reply = node's ledger = dp-accounting
        stored = context.state.config_records[STATE_KEY]
        ledger = PrivacyLedger.from_json(str(stored["json"]))
        (last,) = [r for n, _, r in spy.replies if n == node][-1:]
        assert last.ledger is not None
        history = ledger.history()
        assert last.ledger.history() == history and ledger.rounds == (1, 2)
        assert all(steps > 0 for _, _, steps in history)
        epsilon = last.ledger.epsilon()
        assert epsilon == ledger.epsilon()
        assert epsilon == pytest.approx(
            epsilon_of_history(history, cfg.delta, "rdp"), rel=1e-12
        )
        assert epsilon == pytest.approx(dp_accounting_rdp(history, cfg.delta), rel=5e-3)
        assert 0 < epsilon <= cfg.target_epsilon + 1e-6

    model_json = json.loads((out / "model.json").read_text())
    assert set(model_json["variants"]) == {"float32", "int8"}
    assert model_json["preprocessing"]["kind"] == "callable"
    assert (out / model_json["tokenizer"]["file"]).is_file()  # raw text on a device
    assert all(v["latency_ms_per_example"] > 0 for v in model_json["variants"].values())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").open()]
    assert len(rounds) == 2 and all(r["message_bytes"] for r in rounds)


def test_int4_compressed_adapter_updates_train(tiny_task: str, tmp_path: Path) -> None:
    """The default update compression encodes the adapters' change: the run completes
    and the adapters move."""
    out = tmp_path / "int4"
    cfg = _cfg(tiny_task, out, update_compression="int4", export_compression="none")
    grid = InProcessGrid(federation(cfg, range(NODES), NODES))
    server_app.main(grid, _server_context(cfg))  # type: ignore[arg-type]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("stop_reason")
    final = torch.load(out / "model.pt", weights_only=True)
    assert any(torch.count_nonzero(v) > 0 for k, v in final.items() if "lora_B" in k)


def test_client_level_dp_and_secure_aggregation_carry_adapters(
    tiny_task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central DP-FedAvg moves the adapters and accounts client-level ε on the
    federation ledger; under SecAgg+ the unmasked sum of the adapter vectors is
    exactly the sum of what the clients noised and quantised."""
    from common.tasks.models import build_model
    from server.app import make_strategy
    from tests.helpers import secure_aggregation as secagg

    secagg.server_identity(monkeypatch)
    cfg = secagg.secagg_cfg(
        tmp_path, task=tiny_task, secure_aggregation=False, batch_size=16
    )
    contexts = federation(cfg, range(secagg.NODES), secagg.NODES, first_node=secagg.FIRST)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True)
    strategy = make_strategy(cfg, out, 1)
    strategy.start_run(list(contexts))
    arrays = ArrayRecord(build_model(tiny_task, seed=0).state_dict())
    step = None
    for server_round in (1, 2):
        step = strategy.train_round(server_round, arrays, InProcessGrid(contexts), 0.3)
    assert step is not None and step.arrays is not None
    assert list(step.arrays.keys()) == list(arrays.keys())
    moved = [
        not torch.equal(a, b)
        for a, b in zip(
            arrays.to_torch_state_dict().values(),
            step.arrays.to_torch_state_dict().values(),
            strict=True,
        )
    ]
    assert any(moved)
    ledger = json.loads((out / "federation-ledger.json").read_text())
    history = [tuple(h) for h in ledger["ledger"]["history"]]
    assert ledger["epsilon"] == pytest.approx(
        epsilon_of_history(history, cfg.delta, "rdp"), rel=1e-9
    )

    secagg.use_dealer(tmp_path / "dealer", monkeypatch)
    recorder = secagg.Recorder(monkeypatch)
    protocol = secagg.Protocol(
        secagg.secagg_cfg(tmp_path / "secagg", task=tiny_task, batch_size=16)
    )
    result = protocol.run()
    assert result.failure is None and len(result.contributors) == secagg.NODES
    assert protocol.dim == sum(v.numel() for v in arrays.to_torch_state_dict().values())
    assert np.array_equal(
        result.total, secagg.plain_sum(list(recorder.values.values()), protocol.plan)
    )


def test_the_frontier_benchmark_runs_its_arms(tiny_task: str, tmp_path: Path) -> None:
    """simulations/bench/text_lora.py on the tiny model: a probe and a DP LoRA row."""
    from simulations.bench.text_lora import run_arm, table

    small = {"task": tiny_task, "batch-size": 16, "num-rounds": 1, "local-epochs": 1}
    rows = [
        run_arm(arm, NODES, tmp_path, 1, **small, delta=1e-3)
        for arm in ("probe", "lora-dp8")
    ]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert rows[0]["max_epsilon"] is None and 0 < rows[1]["max_epsilon"] <= 8.0
    assert rows[0]["trainable_parameters"] < rows[1]["trainable_parameters"]
    assert rows[1]["update_bytes_float32"] < rows[1]["full_model_bytes_float32"]
    assert len(table(rows).splitlines()) == 4


def test_a_text_run_resumes_from_its_adapter_checkpoint(
    tiny_task: str, tmp_path: Path
) -> None:
    """Two rounds, then resume to three: the checkpoint holds the adapters alone and
    each node's ledger goes on from round 2."""
    out = tmp_path / "resumed"
    fixed = {"target_epsilon": 0.0, "noise_multiplier": 1.0, "epsilon_budget": 100.0}
    first = _cfg(tiny_task, out, export_compression="none", **fixed)
    server_app.main(
        InProcessGrid(federation(first, range(NODES), NODES)), _server_context(first)
    )  # type: ignore[arg-type]
    again = _cfg(
        tiny_task, out, export_compression="none", num_rounds=3, resume=True, **fixed
    )
    contexts = federation(again, range(NODES), NODES)
    server_app.main(InProcessGrid(contexts), _server_context(again))  # type: ignore[arg-type]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_after_round"] == 2
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").open()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["clients_trained"] == NODES
    for context in contexts.values():
        ledger = PrivacyLedger.from_json(
            str(context.state.config_records[STATE_KEY]["json"])
        )
        assert ledger.rounds == (1, 2, 3)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_text_shards_follow_the_partitioners(tiny_task: str, partitioner: str) -> None:
    """Each client's shard is its partition of the tokenised training part: together
    they hold every training sentence once, as token ids of the model's tokenizer."""
    from client.data.local_data import load_client_shard
    from client.node_settings import NodeSettings
    from common.tasks.registry import get_task

    cfg = _cfg(tiny_task, Path("unused"), partitioner=partitioner, dirichlet_alpha=0.5)
    x_all, _ = get_task(tiny_task).raw("train", "", cfg.seed)
    shards = [
        load_client_shard(
            cfg, NodeSettings.from_node_config({"partition-id": p, "num-partitions": 3})
        )
        for p in range(3)
    ]
    rows = torch.cat([s.x_train for s in shards])
    assert rows.shape == (len(x_all), x_all.shape[1]) and rows.dtype == torch.float32
    assert sorted(map(tuple, rows.long().tolist())) == sorted(map(tuple, x_all.tolist()))
