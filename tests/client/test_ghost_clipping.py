"""grad-sample-mode 'ghost': Opacus' ghost clipping checked against per-example
autograd and Opacus' hooks, inside privfed's own batches, noise and accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client.training.dp_training import train_private
from client.training.ghost_clipping import GhostClipper
from common.config import RunConfig
from common.errors import ConfigError
from common.privacy.dp_sgd_plan import RoundPlan, plan_dp_sgd_round
from common.privacy.randomness import round_generator
from common.run_keys import GRAD_SAMPLE_MODES
from common.tasks.models import DigitsMLP, TanhCNN28
from tests.helpers.per_example import per_example_grads


def _linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


MODELS = {
    "tanh-cnn": (TanhCNN28, (8, 1, 28, 28)),
    "linear": (_linear, (8, 1, 8, 8)),
    "digits-mlp": (DigitsMLP, (8, 1, 8, 8)),
}


def _hooks_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list:
    """Per-sample gradients from Opacus' hooks (GradSampleModule), as a list per example."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    samples = [p.grad_sample.clone() for p in model.parameters()]
    gsm.to_standard_module()
    model.zero_grad()
    return [[s[i] for s in samples] for i in range(len(x))]


def _clipped_sum(grads: list, clip: float) -> list[torch.Tensor]:
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [
        sum(f * gs[j] for f, gs in zip(factors, grads, strict=True))
        for j in range(len(grads[0]))
    ]


@pytest.mark.parametrize("reference", ["per-example", "opacus-hooks"])
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ghost_clipped_sum_equals_the_reference(
    name: str, clip: float, reference: str
) -> None:
    """Σᵢ gᵢ·min(1, C/(‖gᵢ‖+1e-6)) from ghost clipping equals per-example autograd
    and Opacus' hooks, with every example clipped, some, or none."""
    factory, shape = MODELS[name]
    torch.manual_seed(3)
    model = factory()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    grads = (per_example_grads if reference == "per-example" else _hooks_grads)(model, x, y)
    expected = _clipped_sum(grads, clip)

    clipper = GhostClipper(model, F.cross_entropy, clip)
    sums, loss = clipper.clipped_batch(x, y)
    clipper.close()
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(model(x), y, reduction="sum")))
    for param, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(sums[param], want, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_a_clipped_example_contributes_at_most_c() -> None:
    """One example with a large gradient: its whole clipped contribution has norm ≤ C."""
    torch.manual_seed(4)
    model = TanhCNN28()
    clipper = GhostClipper(model, F.cross_entropy, 0.05)
    for i in range(4):
        x, y = 50 * torch.randn(1, 1, 28, 28), torch.tensor([i])
        sums, _ = clipper.clipped_batch(x, y)
        norm = torch.sqrt(sum(s.pow(2).sum() for s in sums.values()))
        assert 0.04 < float(norm) <= 0.05 * (1 + 1e-5)
    clipper.close()


def _one_step(mode: str, sigma: float, seed: int) -> tuple[torch.Tensor, tuple]:
    torch.manual_seed(0)
    model = TanhCNN28()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = torch.randn(120, 1, 28, 28), torch.randint(0, 10, (120,))
    cfg = RunConfig(task="fashion-mnist", batch_size=40, learning_rate=1.0,
                    max_grad_norm=0.5, grad_sample_mode=mode)  # fmt: skip
    plan = dataclasses.replace(plan_dp_sgd_round(len(x), cfg.batch_size, 1), steps=1)
    outcome = train_private(model, x, y, cfg, plan, sigma, round_generator(seed))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return before - after, outcome.history


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_ghost_steps_like_direct_with_privfeds_batches_and_noise(sigma: float) -> None:
    """Same generator seed: the same Poisson batch and the same noise draws, so a
    'ghost' step equals a 'direct' step (the noise is privfed's, not Opacus')."""
    ghost, ghost_history = _one_step("ghost", sigma, seed=7)
    direct, direct_history = _one_step("direct", sigma, seed=7)
    assert ghost_history == direct_history
    assert ghost_history[0][0] == sigma and ghost_history[0][2] == 1
    torch.testing.assert_close(ghost, direct, atol=1e-5, rtol=1e-4)
    if sigma:
        other, _ = _one_step("ghost", sigma, seed=8)
        assert not torch.allclose(ghost, other)


def test_ghost_training_leaves_no_trace_and_draws_no_global_randomness() -> None:
    """A round with empty Poisson batches: every step taken and accounted, the
    global torch RNG untouched, Opacus' hooks and attributes removed afterwards."""
    torch.manual_seed(2)
    model = DigitsMLP()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    cfg = RunConfig(task="digits", batch_size=2, local_epochs=3, grad_sample_mode="ghost")
    plan = RoundPlan(sample_rate=0.1, sampler_rate=0.1, steps=30, expected_batch_size=1)
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    outcome = train_private(model, x, y, cfg, plan, 1.0, round_generator())
    assert torch.equal(state, torch.get_rng_state())
    assert outcome.history == ((1.0, 0.1, 30),)
    assert all(
        not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
    )
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for p in model.parameters():
        assert not any(a in vars(p) for a in ("grad_sample", "_norm_sample"))


def test_ghost_is_a_run_key_value_the_text_task_refuses() -> None:
    """Registered as a mode; a task that lists only 'hooks' refuses it up front."""
    assert "ghost" in GRAD_SAMPLE_MODES
    RunConfig(task="fashion-mnist", grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="supports 'hooks', got 'ghost'"):
        RunConfig(task="sentiment", grad_sample_mode="ghost")
