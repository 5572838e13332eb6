"""Opacus' RDP accountant maths, without running the ``opacus`` package's ``__init__``.

Why: ``import opacus.accountants.analysis.rdp`` first runs ``opacus/__init__``, which
imports the privacy engine, its optimizers and through them ``torch.distributed``,
sympy and scipy.stats: 1.6 CPU-s and ~120 MB in every ClientApp process, and on a
SuperNode each message runs in a fresh one. A client in ``direct`` grad-sample mode
uses none of that; it needs the RDP analysis, one module of numpy and
``scipy.special`` (``opacus/accountants/analysis/rdp.py``).

How: :func:`analysis` executes that very file of the installed Opacus (found with
:func:`importlib.util.find_spec`, which does not import the package) as a private
module, so ε is computed by Opacus' own code, not a copy. Where Opacus is already
imported (the server, the Opacus grad-sample modes, tests) its own module is used.

Two small facts cannot be had without the package init, so they are repeated here
and ``tests/client/test_client_imports.py`` checks them against the pinned Opacus:
``RDPAccountant.DEFAULT_ALPHAS`` (:data:`RDP_ORDERS`) and the bisection of
``opacus.accountants.utils.get_noise_multiplier`` (:func:`rdp_noise_multiplier`, the
same steps over the same ε, so the same σ to the last bit).
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np

OPACUS_MODULE = "opacus.accountants.analysis.rdp"
_PRIVATE_NAME = "common._opacus_rdp_analysis"
# opacus.accountants.RDPAccountant.DEFAULT_ALPHAS (checked against Opacus by the tests).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)
MAX_SIGMA = 1e6  # opacus.accountants.utils.MAX_SIGMA


def analysis_file() -> Path:
    """``opacus/accountants/analysis/rdp.py`` of the installed Opacus."""
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("opacus is not installed (privfed pins opacus==1.6.0)")
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "accountants" / "analysis" / "rdp.py"
    if not path.is_file():
        raise ImportError(f"the installed opacus has no RDP analysis at {path}")
    return path


def load_analysis_file() -> ModuleType:
    """Execute Opacus' RDP analysis file as a module of its own (not ``opacus.*``)."""
    spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, analysis_file())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def analysis() -> ModuleType:
    """Opacus' RDP analysis: the imported module if Opacus is loaded, else its file."""
    return sys.modules.get(OPACUS_MODULE) or load_analysis_file()


def compute_rdp(
    q: float, noise_multiplier: float, steps: int, orders: tuple[float, ...] = RDP_ORDERS
) -> np.ndarray:
    """Opacus' ``compute_rdp``: RDP of ``steps`` subsampled Gaussian steps per order."""
    return analysis().compute_rdp(
        q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders
    )


def get_privacy_spent(
    rdp: np.ndarray, delta: float, orders: tuple[float, ...] = RDP_ORDERS
) -> tuple[float, float]:
    """Opacus' ``get_privacy_spent``: (ε, best order) at ``delta``."""
    return analysis().get_privacy_spent(orders=orders, rdp=rdp, delta=delta)


def rdp_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """ε of one history entry, as ``RDPAccountant.get_epsilon`` computes it."""
    rdp = compute_rdp(sample_rate, noise_multiplier, steps)
    return float(get_privacy_spent(rdp, delta)[0])


def rdp_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    epsilon_tolerance: float = 0.01,
) -> float:
    """``get_noise_multiplier(..., accountant="rdp")``: the same bisection, the same σ."""
    eps_high = float("inf")
    sigma_low: float = 0  # integers, as Opacus starts: σ = 20 stays an int
    sigma_high: float = 10
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = rdp_epsilon(sigma_high, sample_rate, steps, target_delta)
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = rdp_epsilon(sigma, sample_rate, steps, target_delta)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
