"""Tabular federations: pooled vs federated vs local-only, non-private and sample-level DP.

For each federation (common/data/tabular/federations.py), on its central test set:

- pooled, non-private: every training record in one place (the ceiling);
- federated, non-private: FedAvg over the natural sites;
- federated, sample-level DP-SGD at each ε (δ fixed): every site's own ε over the
  whole run, σ calibrated per site by the run's accountant (RDP);
- local-only at each ε: each site alone with the same DP, same epochs; best and
  median site.

AUROC and AUPRC with a 95 % percentile bootstrap CI over resamples of the test set,
and wall time. With ``--privfed RUNS_DIR`` the federated arms are real privfed runs
(``simulations.run --task ... --partitioner sites``: SuperLink, one SuperNode per
site, DP noise from OS entropy), scored from their ``model.pt``. Otherwise, and for
the pooled and local-only arms, the ClientApp's own local step
(client/training/dp_training.py: ``direct`` per-sample clipping, Opacus' Poisson
sampling and noise, σ from common/privacy/dp_sgd_plan.py) runs in process with
example-weighted FedAvg, as privfed's server aggregates. ``--repeats N`` adds each
arm's AUROC mean ± sd over N in-process runs with other noise seeds. ``--validate``
scores on a validation fifth of the training records instead of the test set (to
choose hyper-parameters without touching the test set).

    python -m simulations.bench.tabular --preset all --privfed /tmp/runs --repeats 10
    python -m simulations.bench.tabular --preset credit        # in process, ~30 s
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.training.dp_training import train_non_private, train_private
from common.config import RunConfig
from common.data.tabular.federations import SOURCES, TabularFederation, load_federation
from common.ledger.privacy_ledger import epsilon_of_history
from common.privacy.dp_sgd_plan import (
    calibrate_gaussian_noise_multiplier,
    plan_dp_sgd_round,
)
from common.tasks.metrics import evaluate_binary_model
from common.tasks.tabular_models import MODELS

PRESETS = {"credit": "lending-club", "medical": "nwtco"}
TASKS = {  # the run key 'task' of each federation (common/tasks/credit.py, medical.py)
    "lending-club": "common.tasks.credit:LENDING_CLUB",
    "nwtco": "common.tasks.medical:NWTCO",
}
DELTA = 1e-5
ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters shared by every arm (fixed before looking at the test set)."""

    model: str = "logistic"
    rounds: int = 15
    local_epochs: int = 2
    batch_size: int = 256
    learning_rate: float = 2.0
    momentum: float = 0.0
    max_grad_norm: float = 1.0

    def config(self) -> RunConfig:
        """The run config the ClientApp's training functions read."""
        return RunConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
            grad_sample_mode="direct",
            accountant=ACCOUNTANT,
        )


# Chosen on a validation fifth of the training records (--validate; 8 noise seeds),
# never on the test set.
RECIPES = {
    "lending-club": Recipe(rounds=10, local_epochs=5, batch_size=256, learning_rate=2.0),
    "nwtco": Recipe(rounds=10, local_epochs=5, batch_size=256, learning_rate=1.0),
}


@dataclass(frozen=True)
class Arm:
    """One trained model's scores."""

    name: str
    auroc: float
    auprc: float
    auroc_ci: tuple[float, float]
    auprc_ci: tuple[float, float]
    epsilon: float  # largest per-site ε spent (0 when non-private)
    seconds: float


Part = tuple[torch.Tensor, torch.Tensor]


def _tensors(x: np.ndarray, y: np.ndarray) -> Part:
    return torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(np.array(y))


def federated(
    parts: list[Part],
    num_features: int,
    recipe: Recipe,
    epsilon: float | None,
    seed: int,
) -> tuple[nn.Module, float]:
    """FedAvg (weights by records) over ``parts``; DP-SGD per part when ``epsilon``.

    One part is pooled or local-only training. Returns the model and the largest ε
    any part spent (by the accountant, from the histories actually taken).
    """
    torch.manual_seed(seed)
    model = MODELS[recipe.model](num_features, 2)
    cfg = recipe.config()
    generator = torch.Generator().manual_seed(seed)  # a benchmark: reproducible noise
    plans = [
        plan_dp_sgd_round(len(x), recipe.batch_size, recipe.local_epochs) for x, _ in parts
    ]
    sigmas = [
        calibrate_gaussian_noise_multiplier(
            epsilon, DELTA, plan.sample_rate, recipe.rounds * plan.steps, ACCOUNTANT
        )
        if epsilon is not None
        else 0.0
        for plan in plans
    ]
    histories: list[list[tuple[float, float, int]]] = [[] for _ in parts]
    for _ in range(recipe.rounds):
        states, weights = [], []
        for i, (x, y) in enumerate(parts):
            local = copy.deepcopy(model)
            if epsilon is None:
                train_non_private(local, x, y, cfg, generator)
            else:
                outcome = train_private(local, x, y, cfg, plans[i], sigmas[i], generator)
                histories[i].extend(outcome.history)
            states.append(local.state_dict())
            weights.append(len(x))
        total = float(sum(weights))
        model.load_state_dict(
            {
                key: sum(w / total * s[key] for w, s in zip(weights, states, strict=True))
                for key in states[0]
            }
        )
    spent = max(epsilon_of_history(h, DELTA, ACCOUNTANT) for h in histories)
    return model, spent


def lbfgs(x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, float]:
    """scikit-learn's logistic regression, fitted to convergence: the model family's
    own ceiling, so an under-trained SGD ceiling cannot flatter the DP arms."""
    from sklearn.linear_model import LogisticRegression as Fit

    fit = Fit(max_iter=5000).fit(x.numpy(), y.numpy())
    model = MODELS["logistic"](x.shape[1], 2)
    with torch.no_grad():
        model.linear.weight[1] = torch.from_numpy(fit.coef_[0]).float()
        model.linear.bias[1] = float(fit.intercept_[0])
    return model, 0.0


def bootstrap_ci(
    truth: np.ndarray,
    score: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    resamples: int,
    seed: int,
) -> tuple[float, float]:
    """95 % percentile interval of ``metric`` over resamples of the test records."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(truth), len(truth))
        if truth[pick].min() != truth[pick].max():  # both classes drawn
            values.append(metric(truth[pick], score[pick]))
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def score(
    name: str,
    model: nn.Module,
    test: Part,
    epsilon: float,
    seconds: float,
    resamples: int,
    seed: int,
) -> Arm:
    """The arm's AUROC/AUPRC on ``test``, with bootstrap CIs when ``resamples``."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    metrics = evaluate_binary_model(model, *test)
    with torch.no_grad():
        probability = torch.softmax(model(test[0]), dim=1)[:, 1].double().numpy()
    truth = test[1].numpy()
    nan = (float("nan"), float("nan"))
    return Arm(
        name,
        metrics["auroc"],
        metrics["auprc"],
        bootstrap_ci(truth, probability, roc_auc_score, resamples, seed)
        if resamples
        else nan,
        bootstrap_ci(truth, probability, average_precision_score, resamples, seed)
        if resamples
        else nan,
        epsilon,
        seconds,
    )


def _timed(fn: Callable[[], tuple[nn.Module, float]]) -> tuple[nn.Module, float, float]:
    start = time.perf_counter()
    model, spent = fn()
    return model, spent, time.perf_counter() - start


def _parts(fed: TabularFederation, validate: bool, seed: int) -> tuple[list[Part], Part]:
    """Per-site training parts and the scoring part (test set, or a validation fifth)."""
    x, y, sites = fed.x_train, fed.y_train, fed.site_train
    if not validate:
        test = _tensors(fed.x_test, fed.y_test)
    else:
        rng = np.random.default_rng(seed + 1)
        held = rng.random(len(x)) < 0.2
        test = _tensors(x[held], y[held])
        x, y, sites = x[~held], y[~held], sites[~held]
    parts = [_tensors(x[sites == s], y[sites == s]) for s in range(len(fed.sites))]
    return parts, test


def privfed(
    name: str, recipe: Recipe, epsilon: float | None, seed: int, out: Path
) -> tuple[nn.Module, float]:
    """The federated arm as a real privfed run (``simulations.run``: SuperLink, one
    SuperNode per site, ``partitioner = "sites"``): its final model and max ε."""
    sites = len(load_federation(name, seed).sites)
    privacy = (
        ["--privacy-mode", "none"]
        if epsilon is None
        else ["--privacy-mode", "sample", "--target-epsilon", str(epsilon)]
    )
    command = [
        sys.executable, "-m", "simulations.run", "--task", TASKS[name],
        "--clients", str(sites), "--partitioner", "sites", "--client-cpus", "1",
        "--rounds", str(recipe.rounds), "--local-epochs", str(recipe.local_epochs),
        "--batch-size", str(recipe.batch_size),
        "--learning-rate", str(recipe.learning_rate),
        "--momentum", str(recipe.momentum), "--max-grad-norm", str(recipe.max_grad_norm),
        "--delta", str(DELTA), "--accountant", ACCOUNTANT, "--seed", str(seed),
        "--results-dir", str(out), "--set", 'update-compression="none"', *privacy,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}")
    model = MODELS[recipe.model](load_federation(name, seed).num_features, 2)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    summary = json.loads((out / "summary.json").read_text())
    return model, float(summary["max_epsilon"] or 0.0)


def run_federation(
    name: str, recipe: Recipe, epsilons: tuple[float, ...], resamples: int, seed: int,
    validate: bool = False, runs_dir: Path | None = None, noise_seed: int | None = None,
) -> list[Arm]:  # fmt: skip
    """Every arm of one federation, in table order; federated arms as privfed runs
    under ``runs_dir`` when it is given, else in process (DP noise and model
    initialisation from ``noise_seed``, default ``seed``; the split is ``seed``'s)."""
    fed = load_federation(name, seed)
    train_seed = seed if noise_seed is None else noise_seed
    parts, test = _parts(fed, validate, seed)

    def federate(epsilon: float | None) -> tuple[nn.Module, float]:
        if runs_dir is None:
            return federated(parts, width, recipe, epsilon, train_seed)
        tag = "non-private" if epsilon is None else f"eps{epsilon:g}"
        return privfed(name, recipe, epsilon, seed, runs_dir / f"{name}-{tag}")

    pooled = [(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))]
    width = fed.num_features
    arms = []

    def arm(label: str, fn: Callable[[], tuple[nn.Module, float]], ci: bool = True) -> Arm:
        model, spent, seconds = _timed(fn)
        return score(label, model, test, spent, seconds, resamples if ci else 0, seed)

    arms.append(arm("pooled, non-private, L-BFGS (reference)", lambda: lbfgs(*pooled[0])))
    arms.append(
        arm(
            "pooled, non-private",
            lambda: federated(pooled, width, recipe, None, train_seed),
        )
    )
    via = " (privfed run)" if runs_dir is not None else ""
    arms.append(arm(f"federated, non-private{via}", lambda: federate(None)))
    for eps in epsilons:
        arms.append(arm(f"federated, DP ε={eps:g}{via}", lambda e=eps: federate(e)))
        local = [
            arm(
                f"{fed.sites[i]}",
                lambda p=p, e=eps: federated([p], width, recipe, e, train_seed),
                False,
            )
            for i, p in enumerate(parts)
        ]
        best = max(local, key=lambda a: a.auroc)
        median = statistics.median(a.auroc for a in local)
        largest = local[max(range(len(parts)), key=lambda i: len(parts[i][0]))]
        arms.append(
            Arm(
                f"local-only, DP ε={eps:g}: best site ({best.name}); median AUROC "
                f"{median:.3f}; largest site ({largest.name}) {largest.auroc:.3f}",
                best.auroc, best.auprc, best.auroc_ci, best.auprc_ci,
                max(a.epsilon for a in local), sum(a.seconds for a in local),
            )
        )  # fmt: skip
    return arms


def _ci(value: float, ci: tuple[float, float]) -> str:
    if np.isnan(ci[0]):
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(
    name: str, fed: TabularFederation, arms: list[Arm], spread: list[list[float]] | None
) -> str:
    """A Markdown table of one federation's arms (``spread``: each arm's AUROC in
    repeated in-process runs)."""
    counts = np.bincount(fed.site_train, minlength=len(fed.sites))
    sites = ", ".join(f"{s} {n}" for s, n in zip(fed.sites, counts, strict=True))
    lines = [
        f"**{name}** ({SOURCES[name].item}; positive = {SOURCES[name].positive_label}; "
        f"{len(fed.x_train)} training records at sites {sites}; {len(fed.x_test)} test "
        f"records, {int(fed.y_test.sum())} positive; {fed.num_features} features)",
        "",
        "| arm | AUROC [95 % CI] | AUPRC [95 % CI] | ε per site (RDP, δ=1e-5) | wall s |"
        + (f" AUROC mean ± sd, {len(spread[0])} in-process runs |" if spread else ""),
        "|---|---|---|---|---|" + ("---|" if spread else ""),
    ]
    for i, a in enumerate(arms):
        eps = f"{a.epsilon:.2f}" if a.epsilon else "∞ (non-private)"
        rep = (
            f" {np.mean(spread[i]):.3f} ± {np.std(spread[i], ddof=1):.3f} |"
            if spread
            else ""
        )
        lines.append(
            f"| {a.name} | {_ci(a.auroc, a.auroc_ci)} | {_ci(a.auprc, a.auprc_ci)} | "
            f"{eps} | {a.seconds:.1f} |{rep}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the arms of each chosen federation and print Markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=[*PRESETS, *SOURCES, "all"], default="all")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--bootstrap", type=int, default=1000, help="test-set resamples")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=0, help="in-process runs for mean ± sd")
    p.add_argument("--validate", action="store_true", help="score on a validation fifth")
    p.add_argument(
        "--privfed",
        type=Path,
        metavar="RUNS_DIR",
        help="run the federated arms as real privfed simulations, results under RUNS_DIR",
    )
    for field, default in vars(Recipe()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    chosen = (
        list(SOURCES) if args.preset == "all" else [PRESETS.get(args.preset, args.preset)]
    )
    for name in chosen:
        given = {
            k: getattr(args, k) for k in vars(Recipe()) if getattr(args, k) is not None
        }
        recipe = dataclasses.replace(RECIPES[name], **given)
        print(f"\n{name}: {recipe}; δ = {DELTA}; accountant {ACCOUNTANT}; seed {args.seed}")
        arms = run_federation(
            name, recipe, tuple(args.epsilons), args.bootstrap, args.seed, args.validate,
            args.privfed,
        )  # fmt: skip
        spread = None
        if args.repeats > 1:
            runs = [
                run_federation(
                    name, recipe, tuple(args.epsilons), 0, args.seed, args.validate,
                    None, args.seed * 1000 + r,
                )
                for r in range(args.repeats)
            ]  # fmt: skip
            spread = [[run[i].auroc for run in runs] for i in range(len(arms))]
        print()
        print(table(name, load_federation(name, args.seed), arms, spread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
