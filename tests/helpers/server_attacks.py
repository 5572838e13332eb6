"""What a curious server does with what it knows: replay a client's noise."""

from __future__ import annotations

import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch

import client.training.dp_training as dp_training
from common.config import RunConfig
from common.privacy.dp_sgd_plan import plan_dp_sgd_round
from common.privacy.randomness import round_generator
from common.tasks.models import build_model


def replayed_noise(
    cfg: RunConfig,
    n_records: int,
    sigma: float,
    guess: int,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[torch.Tensor], int]:
    """The server's replay: run the public training code on dummy records of the same
    count with the guessed seed, and sum the noise it draws per parameter."""
    recorded: list[torch.Tensor] = []

    def recording(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            noise = fn(*args, **kwargs)
            recorded.append(noise.detach().clone())
            return noise

        return wrapper

    with monkeypatch.context() as patch:
        patch.setattr(dp_training, "gaussian_noise", recording(dp_training.gaussian_noise))
        patch.setattr(
            opacus_optimizer, "_generate_noise", recording(opacus_optimizer._generate_noise)
        )
        model = build_model("digits", seed=0)
        x = torch.zeros(n_records, 1, 8, 8)
        y = torch.zeros(n_records, dtype=torch.long)
        plan = plan_dp_sgd_round(n_records, cfg.batch_size, cfg.local_epochs)
        dp_training.train_private(model, x, y, cfg, plan, sigma, round_generator(guess))
    n_params = len(list(model.parameters()))
    assert len(recorded) == plan.steps * n_params
    sums = [sum(recorded[i::n_params]) for i in range(n_params)]
    return sums, plan.expected_batch_size  # type: ignore[return-value]
