"""grad-sample-mode 'direct': per-sample clipping checked against per-example autograd."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client.training.dp_training import train_private
from client.training.per_sample_grads import PerSampleClipper, UnsupportedModel
from common.config import RunConfig
from common.privacy.dp_sgd_plan import RoundPlan, plan_dp_sgd_round
from common.privacy.randomness import round_generator
from common.tasks.models import DigitsMLP, TanhCNN28
from tests.helpers.per_example import per_example_grads


def _odd_conv_net() -> nn.Module:
    """Strides, dilation, uneven padding and kernels, and a layer without bias."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2), dilation=2),
        nn.Tanh(),
        nn.Conv2d(4, 2, (2, 3), stride=(1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(2 * 7 * 3, 5),
    )


def _sequence_net() -> nn.Module:
    """A Linear applied to every position of a (B, 3, 6) input (the >2-D path)."""
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 5))


MODELS = {
    "sequence-linear": (_sequence_net, (9, 3, 6)),
    "tanh-cnn": (TanhCNN28, (9, 1, 28, 28)),
    "digits-mlp": (DigitsMLP, (9, 1, 8, 8)),
    "odd-conv": (_odd_conv_net, (9, 3, 17, 15)),
}


@pytest.mark.parametrize("clip_quantile", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sums_equal_per_example_autograd(name: str, clip_quantile: float) -> None:
    """Σᵢ gᵢ·min(1, C/(‖gᵢ‖+1e-6)) from one backward equals the per-example loop."""
    factory, shape = MODELS[name]
    torch.manual_seed(3)
    model = factory()
    x, y = torch.randn(*shape), torch.randint(0, 5, (shape[0],))
    grads = per_example_grads(model, x, y)
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    clip = float(torch.quantile(norms, clip_quantile)) if clip_quantile else 1e-3
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [
        sum(f * gs[j] for f, gs in zip(factors, grads, strict=True))
        for j in range(len(grads[0]))
    ]

    clipper = PerSampleClipper(model)
    sums = clipper.clipped_sums(F.cross_entropy(model(x), y, reduction="sum"), clip)
    clipper.close()
    assert len(sums) == len(expected)
    for param, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(sums[param], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("model", "complaint"),
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2)), "GroupNorm"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "groups=1"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")), "padding='same'"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect")), "padding_mode"),
    ],
)
def test_unsupported_layers_are_refused_by_name(model: nn.Module, complaint: str) -> None:
    """No silent fallback: the error names the layer and the modes that would work."""
    with pytest.raises(UnsupportedModel, match="grad-sample-mode 'direct'") as info:
        PerSampleClipper(model)
    assert complaint in str(info.value) and "'hooks'" in str(info.value)


def test_a_layer_used_twice_is_refused() -> None:
    """Shared weights would need summed per-sample gradients; refused, not miscounted."""
    layer = nn.Linear(4, 4)
    clipper = PerSampleClipper(nn.Sequential(layer))
    with pytest.raises(UnsupportedModel, match="ran twice"):
        layer(layer(torch.randn(2, 4)))
    clipper.close()


def _one_step_delta(sigma: float, seed: int) -> tuple[torch.Tensor, int]:
    torch.manual_seed(0)
    model = TanhCNN28()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = torch.randn(400, 1, 28, 28), torch.randint(0, 10, (400,))
    cfg = RunConfig(task="fashion-mnist", batch_size=100, learning_rate=1.0,
                    max_grad_norm=0.5, grad_sample_mode="direct")  # fmt: skip
    plan = plan_dp_sgd_round(len(x), cfg.batch_size, 1)
    one_step = dataclasses.replace(plan, steps=1)
    outcome = train_private(model, x, y, cfg, one_step, sigma, round_generator(seed))
    assert outcome.history == ((sigma, plan.sample_rate, 1),)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return before - after, plan.expected_batch_size


def test_noise_has_std_sigma_c_over_expected_batch() -> None:
    """Same seed, same Poisson batch: σ=2 minus σ=0 is N(0, (σC/E)²) per coordinate."""
    noiseless, expected_batch = _one_step_delta(0.0, seed=11)
    noisy, _ = _one_step_delta(2.0, seed=11)
    noise = (noisy - noiseless) * expected_batch  # lr 1, no momentum
    assert expected_batch == 100
    assert abs(float(noise.std()) - 2.0 * 0.5) < 0.03  # 26,010 coordinates
    assert abs(float(noise.mean())) < 0.02


def test_poisson_batches_have_the_planned_rate_and_step_count() -> None:
    """Every step samples each example with q = 1/⌈N/B⌉; the round takes plan.steps."""
    torch.manual_seed(5)
    model = DigitsMLP()
    sizes: list[int] = []
    model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
    x, y = torch.randn(1000, 1, 8, 8), torch.randint(0, 10, (1000,))
    cfg = RunConfig(batch_size=50, local_epochs=20, grad_sample_mode="direct")
    plan = plan_dp_sgd_round(len(x), cfg.batch_size, cfg.local_epochs)
    outcome = train_private(model, x, y, cfg, plan, 1.0, round_generator())
    assert plan.steps == 400 and outcome.history == ((1.0, 0.05, 400),)
    assert len(sizes) == 400  # no empty batch expected at 50 per step
    mean, sd = 400 * 50, (400 * 1000 * 0.05 * 0.95) ** 0.5
    assert abs(sum(sizes) - mean) < 4 * sd


def test_models_that_mix_examples_or_carry_buffers_are_refused() -> None:
    """BatchNorm (even frozen) mixes a batch, and its running statistics would be sent."""
    frozen_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False))
    with pytest.raises(UnsupportedModel, match="BatchNorm mixes the examples"):
        PerSampleClipper(frozen_bn)
    with_buffer = nn.Linear(3, 2)
    with_buffer.register_buffer("seen", torch.zeros(3))
    with pytest.raises(UnsupportedModel, match="'seen' is refused"):
        PerSampleClipper(with_buffer)


def test_shared_parameters_are_refused_and_frozen_layers_ignored() -> None:
    """Every trainable parameter must belong to exactly one supported layer."""
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(UnsupportedModel, match="exactly one Conv2d/Linear"):
        PerSampleClipper(nn.Sequential(first, second))
    frozen = nn.Conv2d(2, 2, 3, groups=2).requires_grad_(False)
    PerSampleClipper(nn.Sequential(frozen, nn.Flatten(), nn.Linear(2, 3))).close()


def test_empty_poisson_batches_take_noise_only_steps() -> None:
    """With q = 1/10 on 10 examples most steps are empty: the CNN still steps each time."""
    torch.manual_seed(2)
    model = TanhCNN28()
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    cfg = RunConfig(task="fashion-mnist", batch_size=2, local_epochs=3)
    plan = RoundPlan(sample_rate=0.1, sampler_rate=0.1, steps=30, expected_batch_size=1)
    before = [p.detach().clone() for p in model.parameters()]
    outcome = train_private(model, x, y, cfg, plan, 1.0, round_generator(2))
    assert outcome.history == ((1.0, 0.1, 30),)
    assert all(
        not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
    )
