"""The accountants a run can name (run key ``accountant``), imported on first use.

Opacus keeps ``{name: IAccountant class}`` (``opacus/accountants/registry.py``).
Here a name maps to the *module path* of one accountant instead: importing Opacus'
classes runs the opacus package init, which a ClientApp process (a fresh one per
message) avoids unless its run uses PRV (see :mod:`.opacus_rdp`). Listing and
checking names imports nothing; :func:`get_accountant` imports the one module asked
for. A module provides the members of :class:`Accountant`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, cast

from common.registry import Registry

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

# An Opacus accountant history: (σ, q, steps) per entry.
History = tuple[tuple[float, float, int], ...]


class Accountant(Protocol):
    """What an accountant module provides (module-level names)."""

    NAME: str  # the full name printed beside every ε, e.g. "opacus-rdp"

    def make(self) -> IAccountant:
        """A fresh Opacus accountant (for Opacus' privacy engine)."""
        ...

    def epsilon(self, history: History, delta: float) -> float:
        """ε of a non-empty history of private steps (every σ > 0)."""
        ...

    def noise_multiplier(
        self,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        steps: int,
        epsilon_tolerance: float,
    ) -> float:
        """σ such that ``steps`` steps at rate q end at or just below the target ε."""
        ...


ACCOUNTANTS: Registry[str] = Registry(
    "accountant", {"rdp": f"{__package__}.rdp", "prv": f"{__package__}.prv"}
)


def accountant_names() -> tuple[str, ...]:
    """The short names a run config, a ledger or a node policy may use."""
    return ACCOUNTANTS.names()


def register_accountant(name: str, module: str, *, replace: bool = False) -> None:
    """Make ``name`` selectable; ``module`` (a dotted path) provides :class:`Accountant`."""
    ACCOUNTANTS.register(name, module, replace=replace)


def get_accountant(name: str) -> Accountant:
    """The accountant module registered as ``name`` (imported now if it was not)."""
    return cast(Accountant, importlib.import_module(ACCOUNTANTS.get(name)))
