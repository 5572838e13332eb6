"""Where DP-SGD's randomness comes from: OS entropy, fresh for every round.

The Poisson masks and the Gaussian noise are what make an update private against
whoever receives it. If the server could predict them (from the run's ``seed``, the
round number, a partition id, anything in a message) it could replay the draws and
subtract the noise. So every round gets its own ``torch.Generator`` seeded with 64
bits from :func:`secrets.randbits` (the OS CSPRNG), and nothing the run config or a
message carries enters it.

``reproducible-noise = true`` (simulation research only) seeds the generator from
the seed, the partition and the round instead, and with it the stochastic rounding
of a compressed update (:func:`integer_generator`), so that two runs are identical;
a deployed node refuses it unless its policy allows it, and the results say "not
private against the server".

The generator itself is torch's Mersenne Twister, which is not a CSPRNG; its
outputs are never released directly, only summed into noised gradients, and a
fresh 64-bit seed per round makes replay a 2^64 search with a training run per
guess. Opacus' ``secure_mode`` would use torchcsprng, which has no build for
torch 2.13.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the secure-aggregation stages need no torch
    import torch

_INTEGER_STREAM = 0x636F646563  # keeps a replayed rounding apart from torch's draws


def reproducible_seed(seed: int, partition_id: int, server_round: int) -> int:
    """The seed of ``reproducible-noise`` mode: public, hence replayable by anyone."""
    return (seed * 1_000_003 + partition_id * 7919 + server_round) % 2**63


def round_generator(replay_seed: int | None = None) -> torch.Generator:
    """A generator for one round: OS entropy, or ``replay_seed`` when reproducible."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(64) if replay_seed is None else replay_seed)
    return generator


def gaussian_noise(
    std: float, like: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """N(0, std²) per coordinate, built against floating-point attacks.

    As Opacus' ``secure_mode`` does (Holohan & Braghin 2021, n = 2): discard one
    draw, then sum four N(0, std²) draws and halve the sum, so the low-order bits
    of the result do not reveal a single Gaussian sample.
    """
    import torch

    if std == 0:
        return torch.zeros_like(like)
    torch.normal(0.0, std, (1,), generator=generator)  # discarded, as in Opacus
    total = torch.zeros_like(like)
    for _ in range(4):
        total += torch.normal(
            0.0, std, like.shape, generator=generator, dtype=like.dtype, device=like.device
        )
    return total / 2


def integer_generator(replay_seed: int | None = None) -> np.random.Generator:
    """Integer-valued DP randomness (Skellam noise, randomized rounding), and the
    stochastic rounding of a compressed update (:mod:`common.wire.update_codec`): a
    NumPy PCG64 generator seeded with 128 bits of OS entropy, fresh for each use.

    ``replay_seed`` (``reproducible-noise = true`` only) seeds it from a public seed
    instead, on a stream of its own, so that a replayed run also rounds alike.
    Distributed DP never passes one: a client's noise share must never be
    predictable, or the server could remove it from the sum.
    """
    if replay_seed is None:
        return np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    return np.random.Generator(np.random.PCG64([replay_seed, _INTEGER_STREAM]))
