"""Checkpoint and resume: what the server writes after each round, and reads to continue.

After every round, *before* the round is announced (its ``rounds.jsonl`` line and
the progress line), the server replaces ``checkpoint.pt`` atomically with the
global model, the server optimiser's state (FedAvgM's reference weights and
momentum), the round counter, the strategy's own state (client-level DP: the
adaptive clip norm, the population and a copy of the federation ledger), the run
config, the Flower runs so far and the round's record. A crash after the
checkpoint but before the line leaves a checkpoint one round ahead of
``rounds.jsonl``; a resume appends the checkpoint's record, so no round is lost
or written twice.

The file is a ``torch.save`` archive of tensors and one JSON string, loaded with
``weights_only=True`` (no pickled code), with a SHA-256 digest over its tensors
and metadata, so a damaged file is refused by name instead of being resumed from.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.supercore import log

from common.atomic_files import atomic_write_bytes
from common.config import ConfigError, RunConfig
from server.results.client_outcomes import partition_key
from server.results.run_folder import ROUNDS_FILE
from server.strategies.private_fedavg import PrivateFedAvg

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "privfed-checkpoint/1"

# The run-config keys a resume may change. None of them enters the accounting, the
# data, the model or the mechanism; every other key (δ, privacy mode, task,
# partitioner and its parameters, seed, accountant, number of clients, σ or the ε
# target, clipping, ...) is locked to the value the run started with. An allowlist,
# so that a key added later is locked until someone decides otherwise.
RESUMABLE_KEYS = (
    "num-rounds",
    "node-wait-timeout",
    "round-timeout",
    "torch-threads",
    "grad-sample-mode",
    "export-compression",
    "update-compression",  # post-processing of the released updates
    "results-dir",  # the folder being resumed; it may have been moved
    "resume",
)


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable, or disagrees with the results folder."""


def check_resume_config(saved: Mapping[str, Any], resumed: Mapping[str, Any]) -> None:
    """Refuse a resumed config that changes a locked key (:class:`ConfigError` naming it).

    A key missing from ``saved`` (a folder written before the key existed) is
    compared with the code's default.
    """
    defaults = RunConfig().to_run_config()
    if resumed.get("audit", defaults["audit"]) != "off":
        raise ConfigError(
            "run config key 'audit': an audit run cannot be resumed (its scores compare "
            "the final model with the run's initial one, and the client-level canaries' "
            "contributions live only in the process that ran them); start a new run"
        )
    for key in sorted(set(saved) | set(resumed)):
        if key in RESUMABLE_KEYS:
            continue
        before = saved.get(key, defaults.get(key))
        after = resumed.get(key, defaults.get(key))
        if before != after:
            raise ConfigError(
                f"run config key '{key}': a resumed run must keep {before!r}, the value "
                f"its rounds and ledgers were accounted with; got {after!r} (a resume "
                f"may change only {', '.join(k for k in RESUMABLE_KEYS if k != 'resume')})"
            )


@dataclass(frozen=True)
class Checkpoint:
    """Everything a resumed run needs, as of the end of round ``round``."""

    round: int
    model: dict[str, torch.Tensor]  # the global model's state_dict
    momentum: tuple[np.ndarray, ...] | None  # FedAvgM's momentum vector, if any
    strategy: dict[str, Any]  # the strategy's own state (JSON)
    run_config: dict[str, Any]
    runs: tuple[dict[str, Any], ...]  # each Flower run: id, rounds, wall seconds
    round_record: dict[str, Any]  # the round's rounds.jsonl line
    epsilon_by_partition: dict[str, float | None]  # latest ε each partition reported

    def __post_init__(self) -> None:
        if self.round < 1:
            raise CheckpointError(f"checkpoint round must be >= 1, got {self.round}")
        if self.round_record.get("round") != self.round:
            raise CheckpointError(
                f"checkpoint of round {self.round} holds the record of round "
                f"{self.round_record.get('round')}"
            )

    @property
    def arrays(self) -> ArrayRecord:
        """The global model as Flower arrays."""
        return ArrayRecord(self.model)

    @property
    def wall_seconds(self) -> float:
        """Wall time of every run so far, each up to its last checkpoint."""
        return sum(float(r["wall_seconds"]) for r in self.runs)


def _meta(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "round": ckpt.round,
        "strategy": ckpt.strategy,
        "run_config": ckpt.run_config,
        "runs": list(ckpt.runs),
        "round_record": ckpt.round_record,
        "epsilon_by_partition": ckpt.epsilon_by_partition,
    }


def _digest(meta: str, model: dict[str, torch.Tensor], momentum: list[torch.Tensor]) -> str:
    h = hashlib.sha256(meta.encode("utf-8"))
    for name, tensor in [*model.items(), *((str(i), t) for i, t in enumerate(momentum))]:
        h.update(name.encode("utf-8"))
        h.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def arrays_digest(arrays: list[Any]) -> str:
    """SHA-256 of arrays' bytes, in order: how the log names restored state."""
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    return h.hexdigest()[:16]


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """The file's content (``torch.save`` archive)."""
    meta = json.dumps(_meta(ckpt), sort_keys=True, allow_nan=False)
    model = {k: v.detach().cpu() for k, v in ckpt.model.items()}
    momentum = [torch.from_numpy(np.array(a)) for a in ckpt.momentum or ()]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "meta": meta,
        "model": model,
        "momentum": momentum,
        "has_momentum": ckpt.momentum is not None,
        "sha256": _digest(meta, model, momentum),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def write_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    """Replace ``checkpoint.pt`` atomically (temp file, fsync, rename, fsync folder)."""
    path = out_dir / CHECKPOINT_FILE
    atomic_write_bytes(path, checkpoint_bytes(ckpt))
    return path


def read_checkpoint(out_dir: Path) -> Checkpoint:
    """The folder's checkpoint; missing, unreadable or damaged: :class:`CheckpointError`."""
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is missing: this folder cannot be resumed (a run writes "
            "it after each round; one that died before round 1 has none)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} file")
        meta_text = str(payload["meta"])
        model = dict(payload["model"])
        momentum = list(payload["momentum"])
        if payload["sha256"] != _digest(meta_text, model, momentum):
            raise ValueError("its SHA-256 digest does not match its content")
        meta = json.loads(meta_text)
        return Checkpoint(
            round=int(meta["round"]),
            model=model,
            momentum=tuple(t.numpy() for t in momentum) if payload["has_momentum"]
            else None,
            strategy=dict(meta["strategy"]),
            run_config=dict(meta["run_config"]),
            runs=tuple(dict(r) for r in meta["runs"]),
            round_record=dict(meta["round_record"]),
            epsilon_by_partition=dict(meta["epsilon_by_partition"]),
        )  # fmt: skip
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    except Exception as exc:  # torch.load raises many kinds on a damaged archive
        raise CheckpointError(
            f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}: {exc}); "
            "this folder cannot be resumed from it"
        ) from exc


def strategy_state(strategy: PrivateFedAvg) -> dict[str, Any]:
    """The strategy's own state besides the model and momentum (JSON): its
    :meth:`~server.strategies.private_fedavg.PrivateFedAvg.state_dict`."""
    return strategy.state_dict()


def restore_strategy(strategy: PrivateFedAvg, ckpt: Checkpoint) -> None:
    """Give a strategy (after ``start_run``) the checkpoint's optimiser and own state.

    FedAvgM's reference weights are the checkpoint's model (that is what FedAvgM
    holds after a round) and its momentum continues; the strategy loads its own
    state (client-level DP: the clip norm, the same population, and
    ``federation-ledger.json``, which must hold at least the checkpoint's rounds).
    """
    strategy.current_arrays = ckpt.arrays
    strategy.momentum_vector = list(ckpt.momentum) if ckpt.momentum is not None else None
    log(
        INFO,
        "[privfed] restored round %d: model sha256 %s, momentum sha256 %s",
        ckpt.round,
        arrays_digest(list(ckpt.model.values())),
        arrays_digest(list(ckpt.momentum)) if ckpt.momentum is not None else "none",
    )
    try:
        strategy.load_state_dict(ckpt.strategy)
    except ValueError as exc:  # the strategy's, its ledgers' (LedgerError included)
        raise CheckpointError(f"{CHECKPOINT_FILE}: {exc}") from exc


def updated_epsilons(
    previous: Mapping[str, float | None], record: Mapping[str, Any]
) -> dict[str, float | None]:
    """Each partition's latest reported ε, updated with one round's clients."""
    out = dict(previous)
    for client in record.get("clients", []):
        if client.get("epsilon") is not None:  # rounds.jsonl holds finite ε or null
            key = partition_key(client.get("partition_id"), client["node_id"])
            out[key] = client["epsilon"]
    return out


class Checkpointer:
    """Writes the checkpoint of each round (the round loop calls it before announcing)."""

    def __init__(
        self,
        out_dir: Path,
        cfg: RunConfig,
        strategy: PrivateFedAvg,
        run_id: int,
        started: float,
        previous: Checkpoint | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        self.strategy = strategy
        self.run_id = run_id
        self.started = started  # time.monotonic() at ServerApp start
        self.previous = previous
        self.first_round = previous.round + 1 if previous else 1
        self.last_round: int | None = None  # of this run; None until it checkpoints one
        self.latest: Checkpoint | None = previous

    def runs(self, now: float) -> tuple[dict[str, Any], ...]:
        """The earlier runs and this one, with this run's wall time up to ``now``."""
        earlier = self.previous.runs if self.previous else ()
        this = {
            "run_id": self.run_id,
            "first_round": self.first_round,
            "last_round": self.last_round,
            "wall_seconds": round(now - self.started, 3),
        }
        return (*earlier, this)

    def __call__(
        self, server_round: int, arrays: ArrayRecord, record: dict[str, Any], now: float
    ) -> None:
        """Write the checkpoint of ``server_round``."""
        base = self.latest.epsilon_by_partition if self.latest else {}
        self.last_round = server_round
        momentum = self.strategy.momentum_vector
        ckpt = Checkpoint(
            round=server_round,
            model=arrays.to_torch_state_dict(),
            momentum=tuple(np.asarray(m) for m in momentum) if momentum is not None
            else None,
            strategy=strategy_state(self.strategy),
            run_config=self.cfg.to_run_config(),
            runs=self.runs(now),
            round_record=record,
            epsilon_by_partition=updated_epsilons(base, record),
        )  # fmt: skip
        write_checkpoint(self.out_dir, ckpt)
        self.latest = ckpt


def load_for_resume(out_dir: Path, cfg: RunConfig) -> Checkpoint:
    """The checkpoint to continue from, after checking ``cfg`` may continue it."""
    ckpt = read_checkpoint(out_dir)
    check_resume_config(ckpt.run_config, cfg.to_run_config())
    if cfg.num_rounds <= ckpt.round:
        raise ConfigError(
            f"run config key 'num-rounds': {out_dir} already completed round "
            f"{ckpt.round}; a resume needs num-rounds > {ckpt.round}, got {cfg.num_rounds}"
        )
    log(INFO, "[privfed] resuming %s after round %d of %d", out_dir, ckpt.round,
        cfg.num_rounds)  # fmt: skip
    return ckpt


def resumed_rounds(out_dir: Path, ckpt: Checkpoint) -> list[dict[str, Any]]:
    """``rounds.jsonl`` up to the checkpoint's round, each round once.

    The line of the checkpoint's round may be missing (the server died between the
    checkpoint and the line): it is taken from the checkpoint. A line cut short by
    the kill is dropped. A line after the checkpoint cannot exist (the checkpoint
    comes first); finding one means the files do not belong together.
    """
    path = out_dir / ROUNDS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    rounds: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # appended and fsynced whole, so only a killed write ends early
            raise CheckpointError(f"{path} line {number} is corrupt: {exc}") from exc
    numbers = [r.get("round") for r in rounds]
    if (numbers[-1] if numbers else 0) == ckpt.round - 1:
        rounds.append(ckpt.round_record)
        numbers.append(ckpt.round)
    if numbers != list(range(1, ckpt.round + 1)):
        raise CheckpointError(
            f"{path} holds rounds {numbers}, but {CHECKPOINT_FILE} is of round "
            f"{ckpt.round}: the two files do not belong to one run"
        )
    return rounds
