"""kymatio's 2-D scattering, ported so that one FFT call serves every wavelet of a scale.

Why: kymatio loops over the wavelets one FFT at a time; for the handful of images a
client holds (6 in ``fmnist-client-eps3``) that costs 2.3 ms an image here, and a
client-level round of 100 new clients spent most of its time there. This port
batches the wavelets of a scale and works in chunks of 16 images: 0.5 ms an image,
equal to kymatio to 3e-6 (``tests/common/test_scattering_port.py`` checks it against
kymatio itself). It is also scriptable, which the compressed exports
(``server/export/compression.py``) need: kymatio's own code only traces.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from common.data.features import SCATTERING_GROUPS, ScatteringFront, scattering_front


class ScriptedScattering(nn.Module):
    """kymatio's 2-D scattering (and the group norm of ``ScatteringFront``), scriptable.

    Same padding, filters, periodisation and channel order as
    ``kymatio.scattering2d.core.scattering2d`` for J=2, L angles, order 2. The
    filters are buffers in ``filter_dtype`` (float16 halves the largest part of a
    compressed file), widened to float32 on each call and pre-divided by the number
    of Fourier blocks each one's periodisation averages, so that it only sums.
    """

    def __init__(self, front: ScatteringFront, filter_dtype: torch.dtype) -> None:
        super().__init__()
        kymatio = front._scattering[0]
        js = [int(p["j"]) for p in kymatio.psi]
        self.angles = len(js) // 2
        if (
            kymatio.J != 2
            or kymatio.max_order != 2
            or js != [0] * self.angles + [1] * self.angles
        ):
            raise ValueError(
                "ScriptedScattering ports kymatio's J=2, order-2 scattering only"
            )
        self.chunk = 16  # images per FFT batch: buffers past the CPU cache ran 3-10x slower
        self.groups = SCATTERING_GROUPS
        self.pad = [int(p) for p in kymatio.pad.padding_module.padding]
        phi = [torch.from_numpy(level).to(filter_dtype) for level in kymatio.phi["levels"]]
        self.register_buffer("phi0", phi[0])
        self.register_buffer("phi1", phi[1])
        psi = [torch.from_numpy(p["levels"][0]) for p in kymatio.psi]
        self.register_buffer("psi", torch.stack(psi).to(filter_dtype))

    @staticmethod
    def _periodise(x: torch.Tensor) -> torch.Tensor:
        """Sum of the 2x2 Fourier blocks: subsampling by 2 in space (times 4)."""
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        return x[..., :h, :w] + x[..., h:, :w] + x[..., :h, w:] + x[..., h:, w:]

    @staticmethod
    def _modulus_fft(u: torch.Tensor) -> torch.Tensor:
        """Fourier transform of the modulus of a band-passed signal given in Fourier."""
        z = torch.fft.ifft2(u)
        return torch.fft.fft2(torch.sqrt(z.real * z.real + z.imag * z.imag))

    def _low_pass(self, u: torch.Tensor, phi: torch.Tensor, times: int) -> torch.Tensor:
        """Averaged coefficients: low-pass, subsample by 2**times, back to space, unpad."""
        v = u * phi
        for _ in range(times):
            v = self._periodise(v)
        return torch.fft.ifft2(v).real[..., 1:-1, 1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` normalised images to group-normalised coefficients."""
        phi0 = self.phi0.float() / 16.0  # periodised 4x4 (twice 2x2) wherever used
        phi1 = self.phi1.float() / 4.0
        psi = self.psi.float()
        fine, coarse = psi[: self.angles], psi[self.angles :] / 4.0  # coarse: 2x2
        parts = [self._scatter(p, phi0, phi1, fine, coarse) for p in x.split(self.chunk)]
        return torch.cat(parts)

    def _scatter(
        self,
        x: torch.Tensor,
        phi0: torch.Tensor,
        phi1: torch.Tensor,
        fine: torch.Tensor,
        coarse: torch.Tensor,
    ) -> torch.Tensor:
        """One chunk; all wavelets of a scale in one batched FFT (kymatio loops)."""
        n = x.shape[0]
        u0 = torch.fft.fft2(F.pad(x, self.pad, mode="reflect")[:, 0])
        u1_fine = self._modulus_fft(u0[:, None] * fine)
        u1_coarse = self._modulus_fft(self._periodise(u0[:, None] * coarse))
        # second order: every fine path through every coarse wavelet (n1 outer)
        u2 = self._modulus_fft(self._periodise(u1_fine[:, :, None] * coarse))
        coefficients = [
            self._low_pass(u0, phi0, 2)[:, None],
            self._low_pass(u1_fine, phi0, 2),
            self._low_pass(u1_coarse, phi1, 1),
            self._low_pass(u2, phi1, 1).reshape(n, self.angles * self.angles, 7, 7),
        ]
        return F.group_norm(torch.cat(coefficients, 1), self.groups)


@lru_cache(maxsize=1)
def fast_front() -> ScriptedScattering:
    """One port with float32 filters per process, from kymatio's own filter bank."""
    return ScriptedScattering(scattering_front(), torch.float32)
