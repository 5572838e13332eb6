"""The scattering port that computes every ``scattering`` feature equals kymatio's."""

from __future__ import annotations

import torch

from common.data.features import SCATTERING_SHAPE, compute_features, scattering_front
from common.data.scattering_port import fast_front


def test_features_equal_kymatio_to_float_rounding() -> None:
    """Clients, the server and the audit compute features with the port; kymatio
    (``ScatteringFront``, also what ``model.ts`` traces) is the reference."""
    images = torch.rand(37, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images = (images - 0.5) / 0.5
    with torch.no_grad():
        reference = scattering_front()(images)
    ours = compute_features("scattering", images)
    assert ours.shape == (37, *SCATTERING_SHAPE)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # chunked (16 images per FFT batch) or one by one: the same features
    one_by_one = torch.cat([fast_front()(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(one_by_one, ours[:5], rtol=0, atol=1e-6)
