"""The distributed Skellam mechanism: what each client adds, and how the sum is read.

Agarwal, Kairouz & Liu 2021 ("The Skellam Mechanism for Differentially Private
Federated Learning"), as a client of privfed runs it on its clipped model change
(L2 norm ≤ C) before secure aggregation masks it:

1. flatten, pad to D = 2^⌈log₂ d⌉ and rotate with a randomized Hadamard
   transform (public random signs, fresh each round): an orthonormal map, so the
   norm stays ≤ C, and every coordinate becomes small (≈ C/√D);
2. clip each rotated coordinate to ±c (only shrinks the vector), and scale by s;
3. round to integers with conditional randomized rounding: each coordinate up or
   down with the probability of its fractional part, redrawn until the L2 norm
   is at most Δ₂ (:func:`rounded_l2_bound`);
4. add Skellam noise Sk(V/m) per coordinate, where V = (z·Δ₂)² and m is the least
   number of clients whose noise the round's sum is guaranteed to contain;
5. reduce mod 2^b.

Skellam noise is closed under sums, so the sum of k ≥ m such vectors carries
exactly Sk(k·V/m) — at least noise multiplier z — and mod 2^b commutes with the
sum, so wrap-around is post-processing: it can cost accuracy (bounded by
:meth:`QuantisationPlan.wrap_probability`), never privacy. The server maps the
sum back to signed integers, divides by s and rotates back.

All randomness of steps 3 and 4 comes from OS entropy
(:func:`common.privacy.randomness.integer_generator`); the rotation signs are public.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.secure_aggregation.masks import mask

if TYPE_CHECKING:  # the accountant (scipy, Opacus' RDP) is the server's, not a client's
    from common.secure_aggregation.skellam_accounting import SkellamRound

ROUNDING_BETA = math.exp(-0.5)  # conditional rounding: P(a rounding is redrawn) ≤ β
COORDINATE_CLIP_STDS = 4.0  # default c = 4·C/√D: a rotated norm-C coordinate's 4 RMS
WRAP_PROBABILITY_TARGET = 1e-6  # the scale is chosen so a round wraps less often
MAX_ROUNDING_TRIES = 1000
ROTATION_NONCE = b"privfed-rotation"


def rounded_l2_bound(l2_norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """Largest L2 norm a randomized rounding of a norm-``l2_norm`` vector may keep.

    A rounding whose norm exceeds it is redrawn (conditional randomized rounding);
    with β > 0 the bound is Kairouz, Liu & Steinke 2021's, and it never exceeds the
    trivial ``l2_norm + √D`` (each coordinate moves by less than 1).
    """
    if not l2_norm > 0 or dim < 1 or not 0 <= beta < 1:
        raise ValueError(f"bad rounding bound arguments ({l2_norm}, {dim}, {beta})")
    trivial = l2_norm + math.sqrt(dim)
    if beta == 0:
        return trivial
    squared = (
        l2_norm**2
        + dim / 4
        + math.sqrt(2 * math.log(1 / beta)) * (l2_norm + math.sqrt(dim) / 2)
    )
    return min(trivial, math.sqrt(squared))


def rounded_l1_bound(l2_bound: float, dim: int) -> float:
    """L1 bound of an integer vector of L2 norm ≤ ``l2_bound`` in ``dim`` dimensions."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


def padded_dimension(dim: int) -> int:
    """D: the next power of two ≥ ``dim`` (the Hadamard transform's size)."""
    if dim < 1:
        raise ValueError("a model has at least one parameter")
    return 1 << (dim - 1).bit_length()


def hadamard(vector: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh–Hadamard transform H/√D of a length-2^k vector.

    numpy and scipy have no fast transform (scipy.linalg.hadamard builds the
    D×D matrix: 8 GB for the CNN's D = 32,768), so this is the O(D log D)
    butterfly; a test checks it against scipy's matrix for small D.
    """
    out = np.array(vector, dtype=np.float64)
    size = out.size
    if size & (size - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {size}")
    half = 1
    while half < size:
        view = out.reshape(-1, 2, half)
        first, second = view[:, 0, :].copy(), view[:, 1, :]
        view[:, 0, :] += second
        view[:, 1, :] = first - second
        half *= 2
    return out / math.sqrt(size)


def rotation_signs(seed: bytes, padded_dim: int) -> np.ndarray:
    """The round's public ±1 diagonal of the randomized Hadamard rotation."""
    bits = mask(seed, padded_dim, 1, nonce=ROTATION_NONCE)
    return np.where(bits == 1, 1.0, -1.0)


def rotate(vector: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """H·diag(signs)·x/√D of ``vector`` zero-padded to len(signs)."""
    padded = np.zeros(signs.size)
    padded[: vector.size] = vector
    return hadamard(padded * signs)


def unrotate(vector: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """The inverse of :func:`rotate`, truncated to the first ``dim`` coordinates."""
    return (hadamard(vector) * signs)[:dim]


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One float64 vector of all arrays, in order."""
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``vector`` cut into arrays of the shapes and dtypes of ``like``."""
    out, start = [], 0
    for array in like:
        stop = start + array.size
        out.append(vector[start:stop].reshape(array.shape).astype(array.dtype))
        start = stop
    if start != vector.size:
        raise ValueError(f"a vector of {vector.size} values for {start} parameters")
    return out


def skellam_noise(variance: float, size: int, generator: np.random.Generator) -> np.ndarray:
    """Sk(variance) per coordinate: the difference of two Poisson(variance/2) draws."""
    if variance < 0:
        raise ValueError("a noise variance is >= 0")
    lam = variance / 2
    return generator.poisson(lam, size).astype(np.int64) - generator.poisson(
        lam, size
    ).astype(np.int64)


@dataclass(frozen=True)
class QuantisationPlan:
    """One round's public encoding: sent to every client, read back by the server."""

    dim: int  # d, parameters of the model
    clip_norm: float  # C, the L2 clip of a client's change
    coordinate_clip: float  # c, the clip of each rotated coordinate
    scale: float  # s, integers per unit
    modulus_bits: int  # b: the sum lives mod 2^b
    noise_multiplier: float  # z: the guaranteed noise is z·Δ₂ per coordinate
    min_contributors: int  # m: the round is unmasked only with ≥ m uploads

    def __post_init__(self) -> None:
        positive = ("clip_norm", "coordinate_clip", "scale", "noise_multiplier")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, float) and value > 0 and math.isfinite(value)):
                raise ValueError(
                    f"quantisation plan {name} must be a float > 0, got {value!r}"
                )
        if not 8 <= self.modulus_bits <= 32:
            raise ValueError(f"the modulus is 2^8 … 2^32, got 2^{self.modulus_bits}")
        if self.dim < 1 or self.min_contributors < 1:
            raise ValueError("a plan needs dim >= 1 and min_contributors >= 1")

    @property
    def padded_dim(self) -> int:
        """D, the rotated vector's length."""
        return padded_dimension(self.dim)

    @property
    def modulus(self) -> int:
        """M = 2^b."""
        return 1 << self.modulus_bits

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂ in the integer domain: the rounded norm bound of a norm-C·s vector."""
        return rounded_l2_bound(self.clip_norm * self.scale, self.padded_dim)

    @property
    def l1_sensitivity(self) -> float:
        """Δ₁ in the integer domain."""
        return rounded_l1_bound(self.l2_sensitivity, self.padded_dim)

    @property
    def guaranteed_variance(self) -> float:
        """V = (z·Δ₂)²: the noise variance of a sum of m contributions."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    @property
    def share_variance(self) -> float:
        """V/m, the Skellam variance one client adds."""
        return self.guaranteed_variance / self.min_contributors

    def release(self, contributors: int, sampling_rate: float) -> SkellamRound:
        """The round's mechanism when ``contributors`` uploads are in the sum."""
        from common.secure_aggregation.skellam_accounting import SkellamRound

        if contributors < self.min_contributors:
            raise ValueError(
                f"{contributors} contributions carry less noise than the plan's "
                f"{self.min_contributors}; such a round is never unmasked"
            )
        return SkellamRound(
            contributors * self.share_variance,
            self.l1_sensitivity,
            self.l2_sensitivity,
            sampling_rate,
        )

    def effective_noise_multiplier(self, contributors: int) -> float:
        """Noise std of a sum of ``contributors`` uploads, in units of Δ₂."""
        return math.sqrt(contributors * self.share_variance) / self.l2_sensitivity

    def quantisation_inflation(self) -> float:
        """Δ₂ / (C·s): how much rounding widens the sensitivity (1 = not at all)."""
        return self.l2_sensitivity / (self.clip_norm * self.scale)

    def wrap_probability(self, contributors: int) -> float:
        """Upper bound on P(some coordinate of the sum wraps mod 2^b).

        Each upload's coordinates are at most c·s + 1 in magnitude after rounding,
        so the sum of ``contributors`` of them leaves ``room`` = M/2 − 1 − k(c·s + 1)
        for the noise Sk(k·V/m); union bound over the D coordinates.
        """
        room = self.modulus / 2 - 1 - contributors * (self.coordinate_clip * self.scale + 1)
        if room <= 0:
            return 1.0
        from scipy import stats  # the server's: clients never compute it

        lam = contributors * self.share_variance / 2
        tail = float(stats.skellam.sf(math.floor(room), lam, lam))
        return min(1.0, 2 * tail * self.padded_dim)

    # -- the client's side ----------------------------------------------------------
    def encode(
        self,
        update: Sequence[np.ndarray],
        signs: np.ndarray,
        generator: np.random.Generator,
    ) -> np.ndarray:
        """A client's noised, quantised upload mod 2^b (before masking).

        ``update`` must already be clipped to C; it is clipped again here so the
        sensitivity never rests on the caller.
        """
        vector = flatten(update)
        if vector.size != self.dim:
            raise ValueError(f"an update of {vector.size} parameters, plan has {self.dim}")
        norm = float(np.linalg.norm(vector))
        if norm > self.clip_norm:
            vector = vector * (self.clip_norm / norm)
        rotated = np.clip(
            rotate(vector, signs), -self.coordinate_clip, self.coordinate_clip
        )
        scaled = rotated * self.scale
        rounded = conditional_rounding(scaled, self.l2_sensitivity, generator)
        noised = rounded + skellam_noise(self.share_variance, rounded.size, generator)
        return np.mod(noised, self.modulus).astype(np.uint64)

    # -- the server's side ----------------------------------------------------------
    def decode(
        self, total: np.ndarray, signs: np.ndarray, like: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """The float sum of the uploads behind ``total`` (the unmasked sum mod 2^b)."""
        signed = signed_integers(total, self.modulus_bits)
        return unflatten(unrotate(signed / self.scale, signs, self.dim), like)


def signed_integers(total: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^b as the integers in [−2^(b−1), 2^(b−1))."""
    values = np.asarray(total, dtype=np.int64)
    half = 1 << (bits - 1)
    return np.where(values >= half, values - (1 << bits), values)


def conditional_rounding(
    vector: np.ndarray, l2_bound: float, generator: np.random.Generator
) -> np.ndarray:
    """Unbiased randomized rounding, redrawn until the L2 norm is at most ``l2_bound``."""
    floor = np.floor(vector)
    fraction = vector - floor
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (generator.random(vector.size) < fraction)
        if float(np.linalg.norm(rounded)) <= l2_bound:
            return rounded.astype(np.int64)
    raise RuntimeError(
        f"no rounding within the norm bound after {MAX_ROUNDING_TRIES} draws "
        "(the input was not clipped)"
    )


def plan_skellam_round(
    dim: int,
    clip_norm: float,
    noise_multiplier: float,
    cohort: int,
    min_contributors: int,
    modulus_bits: int,
    coordinate_clip: float = 0.0,
    wrap_target: float = WRAP_PROBABILITY_TARGET,
) -> QuantisationPlan:
    """The largest scale s whose sum of ``cohort`` uploads wraps with probability ≤
    ``wrap_target``; ``coordinate_clip`` 0 means 4·C/√D.

    Raises :class:`ValueError` when even the coarsest scale cannot hold the sum
    (the modulus is too small for the cohort and the noise).
    """
    padded = padded_dimension(dim)
    clip = coordinate_clip or COORDINATE_CLIP_STDS * clip_norm / math.sqrt(padded)

    def plan(scale: float) -> QuantisationPlan:
        return QuantisationPlan(
            dim, float(clip_norm), float(clip), float(scale), modulus_bits,
            float(noise_multiplier), min_contributors,
        )  # fmt: skip

    low = 1e-6 / clip_norm  # C·s ≪ 1: rounding noise dominates, the sum is ~√D wide
    if plan(low).wrap_probability(cohort) > wrap_target:
        raise ValueError(
            f"a sum of {cohort} uploads does not fit mod 2^{modulus_bits} at any scale "
            f"(noise multiplier {noise_multiplier:.3g}, {padded} coordinates); "
            "raise secagg-modulus-range"
        )
    high = low
    while plan(high * 2).wrap_probability(cohort) <= wrap_target:
        high *= 2
    # bisect on log scale between high (fits) and 2·high (does not)
    lo, hi = high, high * 2
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if plan(mid).wrap_probability(cohort) <= wrap_target:
            lo = mid
        else:
            hi = mid
    return plan(lo)
