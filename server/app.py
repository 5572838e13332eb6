"""The ServerApp: private FedAvg with central evaluation and a results folder."""

from __future__ import annotations

import random
import statistics
import time
import traceback
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.audit.canaries import inserts_canary_records
from common.audit.gradient_canaries import white_box_applies
from common.config import RunConfig, noise_statement
from common.tasks.model_checks import check_task_model
from common.tasks.models import build_run_model, count_parameters
from common.tasks.registry import get_task, is_task_reference
from server.central_evaluation import CentralEvaluator
from server.checks.ledger_witness import LedgerWitness
from server.checks.update_validation import UpdateValidator
from server.federation_loop import LoopResult, run_rounds
from server.messaging import run_bytes
from server.results.checkpoint import (
    Checkpoint,
    Checkpointer,
    load_for_resume,
    resumed_rounds,
)
from server.results.client_outcomes import partition_key
from server.results.dropouts import count_dropouts
from server.results.epsilon_text import epsilon_text
from server.results.exit_summary import ExitSummary
from server.results.outcome import failure_summary, loop_outcome, summarise_start_failure
from server.results.run_folder import ResultsWriter, resolve_results_dir
from server.strategies.client_level import ClientLevelFedAvg
from server.strategies.private_fedavg import PrivateFedAvg
from server.strategies.registry import strategy_factory
from server.virtual_grid import VirtualGrid

app = ServerApp()


def make_strategy(
    cfg: RunConfig,
    out_dir: Path | None = None,
    run_id: int = 0,
    *,
    witness: LedgerWitness | None = None,
) -> PrivateFedAvg:
    """The strategy of ``cfg``'s privacy mode (server/strategies/registry.py):
    client-level DP keeps its ledger in ``out_dir``; node ledgers are witnessed in
    ``witness`` if given."""
    shared: dict[str, Any] = {
        "ledger_witness": witness,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_evaluate_nodes": cfg.min_train_nodes,
        # min-available-nodes is awaited once, before round 1 (wait_for_nodes); after
        # that a round needs only min-train-nodes, so the run goes on without a
        # node that dropped out.
        "min_available_nodes": cfg.min_train_nodes,
        "server_learning_rate": cfg.server_learning_rate,
        "server_momentum": cfg.server_momentum,
    }
    shared["validator"] = UpdateValidator(cfg)  # every trained reply, before aggregation
    return strategy_factory(cfg)(cfg, out_dir, run_id, shared)


def summarise(
    cfg: RunConfig,
    result: LoopResult,
    wall_seconds: float,
    strategy: PrivateFedAvg | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` of a finished run."""
    latest = result.state.latest
    per_client = {
        partition_key(o.partition_id, n): o.to_dict()["epsilon"]
        for n, o in sorted(latest.items(), key=lambda kv: (kv[1].partition_id, kv[0]))
    }
    last = writer_round(result)
    final_statuses = [o.status.value for o in result.state.latest.values()]
    outcome = loop_outcome(
        result.rounds_completed, cfg.num_rounds, final_statuses, result.budget_stop
    )
    return {
        "status": outcome.value,
        "stop_reason": result.stop_reason,
        "rounds_completed": result.rounds_completed,
        "rounds_planned": cfg.num_rounds,
        "privacy_model": cfg.privacy.description,
        "privacy_unit": cfg.privacy_unit,
        "noise": noise_statement(cfg),
        "noise_reproducible": cfg.privacy_unit is not None and cfg.reproducible_noise,
        "accountant": last.get("accountant") if cfg.privacy_unit else "none",
        "delta": last.get("delta") if cfg.privacy_unit else None,
        "max_epsilon": last.get("max_epsilon"),
        "max_epsilon_infinite": last.get("max_epsilon_infinite", False),
        "epsilon_text": epsilon_text(last) if last else None,
        "epsilon_by_partition": per_client if cfg.is_private else None,
        "client_level": strategy.summary_block() if strategy is not None else None,
        "nodes_keeping_ledger_private": result.state.unreleased()
        if cfg.is_private
        else None,
        "budget_refusals": result.state.refusals,
        "policy_refusals": result.state.policy_refusals,
        "client_failures": result.state.failures,
        "rejected_updates": result.state.rejections,
        "wall_seconds": round(wall_seconds, 3),
        "time_breakdown_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "orchestration_seconds_per_round_median": _median_orchestration(result),
    }


def writer_round(result: LoopResult) -> dict[str, Any]:
    """The last round's record (privacy facts as the loop computed them)."""
    return result.last_record or {}


def _median_orchestration(result: LoopResult) -> float | None:
    """Median per-round orchestration time (see rounds.jsonl ``timing_seconds``)."""
    per_round = result.orchestration_per_round
    return round(statistics.median(per_round), 4) if per_round else None


def whole_run(
    summary: dict[str, Any],
    checkpointer: Checkpointer,
    resume: Checkpoint | None,
    now: float,
) -> dict[str, Any]:
    """What a summary says about every Flower run of a (possibly resumed) run.

    ``wall_seconds`` adds the earlier runs' time up to their last checkpoint; each
    partition's ε is its latest report, from before the resume if it has not
    trained since.
    """
    runs = checkpointer.runs(now)
    out: dict[str, Any] = {
        "runs": list(runs),
        "wall_seconds": round(sum(float(r["wall_seconds"]) for r in runs), 3),
    }
    if resume is not None:
        out["resumed_after_round"] = resume.round
        if summary.get("epsilon_by_partition") is not None:
            out["epsilon_by_partition"] = {
                **resume.epsilon_by_partition,
                **summary["epsilon_by_partition"],
            }
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by ``context.run_config``."""
    started = time.monotonic()
    try:
        cfg = RunConfig.from_run_config(context.run_config)
        out_dir = resolve_results_dir(cfg)
        resume = load_for_resume(out_dir, cfg) if cfg.resume else None
        writer = ResultsWriter(
            out_dir, cfg, resumed_rounds(out_dir, resume) if resume else None
        )
    except Exception as exc:  # no results folder yet: make one say why, if we may
        summarise_start_failure(dict(context.run_config), exc)
        raise
    log(INFO, "[privfed] results folder: %s", out_dir)
    if cfg.reproducible_noise:
        log(WARNING, "[privfed] reproducible-noise = true: %s", noise_statement(cfg))
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    torch.set_num_threads(cfg.torch_threads)
    strategy: PrivateFedAvg | None = None
    checkpointer: Checkpointer | None = None

    def write_failure(reason: str, trace: str | None = None) -> None:
        summary = failure_summary(reason, writer.rounds, cfg.num_rounds)
        if strategy is not None and strategy.summary_block() is not None:
            # The federation ledger may hold a round rounds.jsonl does not (it is
            # written first): the failed run's client-level ε is the ledger's.
            summary["client_level"] = strategy.summary_block()
        if checkpointer is not None:
            summary["runs"] = list(checkpointer.runs(time.monotonic()))
        writer.write_summary({**summary, **({"traceback": trace} if trace else {})})

    on_exit = ExitSummary(write_failure)  # flwr stop: the summary before Flower's 5 s
    on_exit.arm()
    try:
        check_task_model(cfg)  # a model the privacy mode cannot train fails now
        if is_task_reference(cfg.task):  # a user's model the export cannot script
            from server.export.torchscript import check_exportable

            check_exportable(cfg)
        evaluator = CentralEvaluator(cfg)
        if inserts_canary_records(cfg):
            from server.audit.privacy_audit import check_canaries

            check_canaries(cfg)  # a bad audit-canaries fails before round 1
        model = build_run_model(cfg, evaluator.num_classes, seed=cfg.seed)
        initial = resume.arrays if resume else ArrayRecord(model.state_dict())
        strategy = make_strategy(
            cfg, out_dir, int(context.run_id), witness=LedgerWitness.beside(out_dir)
        )
        if white_box_applies(cfg):  # gradient canaries, scored on every update
            from server.audit.gradient_canary_scores import GradientCanaryScores

            strategy.white_box = GradientCanaryScores(cfg, count_parameters(model))
        checkpointer = Checkpointer(
            out_dir, cfg, strategy, int(context.run_id), started, resume
        )
        if cfg.virtual_clients:  # a simulation whose SuperNodes host many clients
            grid = VirtualGrid(grid, cfg.virtual_clients)
        result = run_rounds(
            grid, cfg, strategy, initial, evaluator, writer, started, checkpointer, resume
        )
        summary = summarise(cfg, result, time.monotonic() - started, strategy)
        summary.update(whole_run(summary, checkpointer, resume, time.monotonic()))
        summary["message_bytes"] = run_bytes(writer.rounds)
        summary["dropped_nodes"] = count_dropouts(writer.rounds)
        if writer.rounds:
            summary["final_central"] = writer.rounds[-1]["central"]
            # imported here: matplotlib and the exporter cost every run's start-up
            from server.export.torchscript import export_model
            from server.results.plots import plot_rounds

            title = f"{get_task(cfg.task).name}, {cfg.partitioner}"
            plot_rounds(writer.rounds, out_dir, title)
            export_model(
                result.arrays,
                cfg,
                out_dir,
                {
                    "round": result.rounds_completed,
                    "central_accuracy": summary["final_central"]["accuracy"],
                    "max_epsilon": summary["max_epsilon"],
                    "accountant": summary["accountant"],
                    "delta": summary["delta"],
                    "privacy_unit": summary["privacy_unit"],
                    "epsilon_text": summary["epsilon_text"],
                },
            )
        if writer.rounds and inserts_canary_records(cfg):
            from server.audit.privacy_audit import run_sample_level_audit

            summary["audit"], audit_line = run_sample_level_audit(
                cfg, result.arrays.to_torch_state_dict(), summary["max_epsilon"], out_dir
            )
            if strategy.white_box is not None:
                white = strategy.white_box.block(out_dir, summary["max_epsilon"])
                summary["audit"]["white_box"] = white
                audit_line += (
                    f"; white-box (gradient canaries, every round's update) "
                    f"ε ≥ {white['epsilon_lower_bound']:.3f}"
                )
        if writer.rounds and isinstance(strategy, ClientLevelFedAvg):  # canary clients
            client_audit = strategy.audit_block(result.arrays)
            if client_audit is not None:
                from server.audit.canary_clients import canary_audit_line

                summary["audit"], audit_line = client_audit, canary_audit_line(client_audit)
        on_exit.disarm()
        writer.write_summary(summary)
    except BaseException as exc:
        on_exit.disarm()
        write_failure(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        raise
    log(
        INFO,
        "[privfed] done: %s; final accuracy %s, %s; results in %s",
        summary["stop_reason"],
        summary.get("final_central", {}).get("accuracy"),
        summary["epsilon_text"],
        out_dir,
    )
    if "audit" in summary:
        log(INFO, "[privfed] %s", audit_line)
