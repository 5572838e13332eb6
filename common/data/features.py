"""Fixed input features: raw pixels, or a wavelet scattering transform (ScatterNet).

``scattering`` is the hand-designed feature map of Tramèr & Boneh (2021, "Differentially
Private Learning Needs Better Features"): a 2-D scattering transform (J=2, L=8,
kymatio) of each normalised 28x28 image, 81 channels of 7x7, then group
normalisation over 27 groups of 3 channels computed on that image alone. Nothing in
it is learned or estimated from data, so it costs no privacy: a client transforms
its own examples once, and DP-SGD trains only the model on top.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

SCATTERING_SHAPE = (81, 7, 7)  # (1 + J·L + L²·J(J−1)/2) channels at 28 / 2^J
SCATTERING_GROUPS = 27
_CHUNK = 1000  # images per scattering call (bounds the FFT buffers)


def _scattering_2d(side: int) -> nn.Module:
    """kymatio's scattering with a plain complex modulus (exportable by tracing).

    kymatio's own modulus is a custom autograd Function (for a stable gradient at
    0), which TorchScript cannot export; the features are never differentiated,
    so the plain modulus gives identical values.
    """
    from kymatio.scattering2d.backend.torch_backend import TorchBackend2D
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    class _PlainModulus(TorchBackend2D):
        @classmethod
        def modulus(cls, x: torch.Tensor) -> torch.Tensor:
            return (x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1]).sqrt()[..., None]

    return ScatteringTorch2D(J=2, shape=(side, side), L=8, backend=_PlainModulus)


class ScatteringFront(nn.Module):
    """``(N, 1, 28, 28)`` normalised images to ``(N, 81, 7, 7)`` scattering features.

    Has no parameters and no state-dict entries: the wavelet filters are fixed, so
    they are held outside the module tree (and become constants when traced).
    """

    def __init__(self, side: int = 28) -> None:
        super().__init__()
        self._scattering = (_scattering_2d(side),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients, group-normalised per image."""
        coefficients = self._scattering[0](x[:, 0].contiguous())
        return F.group_norm(coefficients, SCATTERING_GROUPS)


@lru_cache(maxsize=1)
def scattering_front() -> ScatteringFront:
    """One shared front per process (building the filter bank takes ~0.1 s)."""
    return ScatteringFront()


def compute_features(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The model input for images ``x`` under feature map ``kind``."""
    if kind == "pixels":
        return x
    if kind != "scattering":
        raise ValueError(f"run config key 'features': unknown feature map {kind!r}")
    if x.shape[1:] != (1, 28, 28):
        raise ValueError(
            f"run config key 'features': 'scattering' needs 28x28 images, got "
            f"{tuple(x.shape[1:])}"
        )
    if len(x) == 0:
        return torch.zeros(0, *SCATTERING_SHAPE)
    from common.data.scattering_port import fast_front  # it imports this module

    front = fast_front()  # kymatio's transform, 4x faster on a client's few images
    with torch.no_grad():
        return torch.cat([front(chunk) for chunk in x.split(_CHUNK)])
