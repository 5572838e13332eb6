"""Command-line options shared by the scripts, mapped to validated run-config keys."""

from __future__ import annotations

import argparse
import json
import math
import os
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from common.data.datasets import DatasetError
from common.privacy.client_level_plan import plan_client_level
from common.run_keys import ACCOUNTANTS, PRIVACY_MODES, check_key
from common.secure_aggregation.plan import secagg_noise_multiplier
from common.tasks.model_checks import check_task_model
from common.tasks.models import model_dimension
from common.tasks.registry import get_task, is_task_reference, task_names
from server.results.checkpoint import (
    CheckpointError,
    check_resume_config,
    read_checkpoint,
    resumed_rounds,
)
from simulations.launch.preflight import check_federation
from simulations.presets import PRESETS, preset_help

APP_DIR = Path(__file__).resolve().parents[2]
DEFAULT_CLIENTS = 10

# CLI option -> run-config key; None means "leave the pyproject default".
_OPTION_KEYS = {
    "task": "task",
    "data_dir": "data-dir",
    "rounds": "num-rounds",
    "partitioner": "partitioner",
    "alpha": "dirichlet-alpha",
    "classes_per_client": "classes-per-client",
    "target_epsilon": "target-epsilon",
    "noise_multiplier": "noise-multiplier",
    "epsilon_budget": "epsilon-budget",
    "delta": "delta",
    "accountant": "accountant",
    "privacy_mode": "privacy-mode",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "learning_rate": "learning-rate",
    "momentum": "momentum",
    "max_grad_norm": "max-grad-norm",
    "fraction_train": "fraction-train",
    "seed": "seed",
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of clients or CPUs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds > 0, got {text!r}"
        )
    return value


RAY_ADDRESS_ENV = "RAY_ADDRESS"


def ray_address(text: str) -> str:
    """argparse type: a running Ray cluster's head, ``HOST:PORT`` (what ``ray start
    --head`` prints as its address, e.g. ``10.0.0.5:6379``)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or "/" in host or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT of a Ray head node (e.g. 10.0.0.5:6379), got {text!r}"
        )
    if not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {text!r}")
    return text.strip()


def resolve_ray_address(option: str | None) -> str | None:
    """The Ray cluster a simulation attaches to: ``--ray-address``, else
    ``$RAY_ADDRESS`` (Ray's own variable), else None: a private Ray instance.

    ``RAY_ADDRESS=local`` also means a private instance. Anything else in
    ``$RAY_ADDRESS`` must be ``HOST:PORT`` (a :class:`ConfigError` otherwise).
    """
    if option is not None:
        return option
    inherited = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if inherited in ("", "local"):
        return None
    try:
        return ray_address(inherited)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(
            f"${RAY_ADDRESS_ENV}={inherited!r} {exc}; unset it, or pass --ray-address"
        ) from None


def add_run_options(
    p: argparse.ArgumentParser, nodes_help: str, nodes_aliases: tuple[str, ...] = ()
) -> None:
    """Options shared by the simulation and deployment scripts (docs/run-keys.md)."""
    p.add_argument(
        "--clients",
        *nodes_aliases,
        type=positive_int,
        help=f"{nodes_help} (default: the preset's, else {DEFAULT_CLIENTS})",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a tuned recipe applied before the other options: " + preset_help(),
    )
    p.add_argument("--rounds", type=int)
    p.add_argument(
        "--task",
        "--dataset",  # its name before tasks (run key 'dataset' is now 'task')
        dest="task",
        metavar="TASK",
        help=f"a built-in task ({', '.join(task_names())}) or package.module:attribute "
        "importable by every client (docs/tasks.md); default: digits",
    )
    p.add_argument("--data-dir", help="directory with the IDX .gz files")
    p.add_argument("--partitioner", choices=["iid", "dirichlet", "pathological", "sites"])
    p.add_argument("--alpha", type=float, help="Dirichlet concentration")
    p.add_argument("--classes-per-client", type=int)
    p.add_argument("--target-epsilon", type=float)
    p.add_argument("--noise-multiplier", type=float)
    p.add_argument("--epsilon-budget", type=float)
    p.add_argument("--delta", type=float)
    p.add_argument("--accountant", choices=ACCOUNTANTS)
    p.add_argument("--privacy-mode", choices=PRIVACY_MODES)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--fraction-train", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--results-dir", help="default: results/<time>-<dataset>")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key (TOML value), repeatable",
    )
    p.add_argument(
        "--timeout", type=positive_seconds, default=3600.0, help="seconds for the run"
    )
    p.add_argument(
        "--resume",
        metavar="RESULTS_DIR",
        help="continue that run from its checkpoint (only some keys may change, "
        "e.g. --rounds; see docs/troubleshooting.md, 'Resuming a run')",
    )


def resolve_clients(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--clients`` from the preset (or the default) when it was not given."""
    if args.clients is None and getattr(args, "resume", None):
        return args  # the resumed run's own (resume_overrides)
    if args.clients is None:
        preset = PRESETS[args.preset] if args.preset else None
        args.clients = (preset.clients if preset else None) or DEFAULT_CLIENTS
    return args


def parse_set_items(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items (TOML values), each key checked on its own before any
    is used."""
    parsed: dict[str, Any] = {}
    for item in items:
        try:
            pairs = tomllib.loads(item)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"--set {item!r}: not KEY=VALUE in TOML syntax ({exc})"
            ) from None
        for key, value in pairs.items():
            try:
                parsed[key] = check_key(key, value)
            except ConfigError as exc:
                raise ConfigError(f"--set {item!r}: {exc}") from None
    return parsed


def build_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Run-config overrides from the options; validated before anything starts."""
    overrides: dict[str, Any] = dict(PRESETS[args.preset].run_config) if args.preset else {}
    overrides.update(parse_set_items(args.set))
    if overrides.get("resume"):
        raise ConfigError(
            "run config key 'resume': continue a run with --resume RESULTS_DIR, which "
            "checks its checkpoint and config first"
        )
    set_results = overrides.pop("results-dir", "")
    if args.results_dir and set_results and Path(args.results_dir) != Path(set_results):
        raise ConfigError(
            f"run config key 'results-dir': --results-dir {args.results_dir!r} and "
            f"--set results-dir={set_results!r} disagree; give one"
        )
    if overrides.get("min-available-nodes", args.clients) != args.clients:
        raise ConfigError(
            "run config key 'min-available-nodes': these scripts set it to --clients "
            f"({args.clients}), got --set min-available-nodes="
            f"{overrides['min-available-nodes']}"
        )
    for option, key in _OPTION_KEYS.items():
        value = getattr(args, option)
        if value is not None:
            overrides[key] = value
    overrides["min-available-nodes"] = args.clients
    overrides.setdefault("min-train-nodes", min(2, args.clients))
    if args.privacy_mode == "none" and args.target_epsilon is None:
        overrides["target-epsilon"] = 0.0  # also clears a preset's ε target
    if args.noise_multiplier is not None and args.target_epsilon is None:
        overrides["target-epsilon"] = 0.0  # the σ option replaces the default ε target
    task = str(overrides.get("task", RunConfig().task)).replace(":", "-")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results = Path(args.results_dir or set_results or Path("results", f"{stamp}-{task}"))
    results = results.expanduser().resolve()
    if (results / "rounds.jsonl").exists() or (results / "summary.json").exists():
        raise ConfigError(
            f"--results-dir {results} already holds a run; choose a new directory"
        )
    overrides["results-dir"] = str(results)
    defaults = pyproject_defaults()
    cfg = RunConfig.from_run_config({**defaults, **overrides})  # fail before starting
    if cfg.secure_aggregation:  # δ < 1/n, and the typical round's sum must fit
        secagg_noise_multiplier(cfg, args.clients, model_dimension(cfg))
    elif cfg.is_client_level:
        plan_client_level(cfg, args.clients)  # δ < 1/n, the adaptive noise split
    try:  # the task's files are there (digits: inside scikit-learn)
        get_task(cfg.task).training_sources(cfg.data_dir)
    except DatasetError as exc:
        raise ConfigError(str(exc)) from None
    check_task_model(cfg)  # a model the privacy mode cannot train (BatchNorm, say)
    if is_task_reference(cfg.task):  # a user's model the final export cannot script
        from server.export.torchscript import check_exportable

        check_exportable(cfg)
    check_federation(cfg, args.clients)  # the keys that need the data
    return overrides


def resume_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run config of a resumed run: the folder's own, with the options given.

    Refuses (:class:`ConfigError`, before anything starts) a folder without a
    readable config.json or checkpoint, a changed locked key (named), and a run
    with no rounds left. Sets ``args.clients`` to the run's number of clients.
    """
    results = Path(args.resume).expanduser().resolve()
    config_file = results / "config.json"
    try:
        saved = dict(json.loads(config_file.read_text(encoding="utf-8"))["run_config"])
        if "dataset" in saved:  # a run from before run key 'task' replaced 'dataset'
            saved["task"] = saved.pop("dataset")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--resume {results}: {config_file} is missing or unreadable ({exc})"
        ) from None
    try:
        checkpoint = read_checkpoint(results)
        resumed_rounds(results, checkpoint)  # rounds.jsonl and the checkpoint agree
    except CheckpointError as exc:
        raise ConfigError(f"--resume {results}: {exc}") from None
    if args.preset:
        raise ConfigError(
            "--preset cannot be combined with --resume (the run keeps its own)"
        )
    asked = parse_set_items(args.set)
    for option, key in _OPTION_KEYS.items():
        if getattr(args, option) is not None:
            asked[key] = getattr(args, option)
    if args.clients is not None:
        asked["min-available-nodes"] = args.clients
    if args.results_dir and Path(args.results_dir).expanduser().resolve() != results:
        raise ConfigError(
            f"run config key 'results-dir': a resumed run writes to {results}, the "
            f"folder it continues; got --results-dir {args.results_dir!r}"
        )
    resumed = {**saved, **asked, "results-dir": str(results), "resume": True}
    check_resume_config(saved, resumed)
    cfg = RunConfig.from_run_config({**pyproject_defaults(), **resumed})
    if cfg.num_rounds <= checkpoint.round:
        raise ConfigError(
            f"run config key 'num-rounds': {results} already completed round "
            f"{checkpoint.round} of {cfg.num_rounds}; resume with --rounds N "
            f"(N > {checkpoint.round}) to run more"
        )
    args.clients = cfg.min_available_nodes
    print(
        f"[privfed] resuming {results} after round {checkpoint.round} of "
        f"{cfg.num_rounds} (Flower runs so far: "
        f"{', '.join(str(r['run_id']) for r in checkpoint.runs)})",
        flush=True,
    )
    return resumed


def pyproject_defaults() -> dict[str, Any]:
    with open(APP_DIR / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
