"""Central evaluation in channels-last layout: the same scores, and only where it agrees."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from common.config import RunConfig
from common.tasks.models import build_run_model
from common.tasks.scoring import evaluate_task
from server.central_evaluation import CentralEvaluator, _channels_last

CFG = RunConfig.from_run_config(
    {"task": "fashion-mnist", "features": "pixels", "num-rounds": 1}
)


def test_a_cnn_is_scored_as_in_the_default_layout() -> None:
    evaluator = CentralEvaluator(CFG)
    assert evaluator.x_test.is_contiguous(memory_format=torch.channels_last)
    model = build_run_model(CFG, 10, seed=5)
    expected = evaluate_task(
        CFG.task, model, evaluator.x_test.contiguous(), evaluator.y_test
    )
    got = evaluator(ArrayRecord(model.state_dict()))
    assert got.keys() == expected.keys()
    assert got["accuracy"] == expected["accuracy"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    # Loaded again, the weights keep the fast layout (load_state_dict copies into them).
    conv = next(p for p in evaluator.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


class _Viewing(nn.Module):
    """A user's CNN that flattens with ``view``, which a channels-last tensor refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.out = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x).view(len(x), -1))


def test_a_model_that_refuses_the_layout_keeps_the_default() -> None:
    model = _Viewing()
    x = torch.randn(8, 1, 28, 28)
    with pytest.raises(RuntimeError, match="view"):  # what the check runs into
        model.to(memory_format=torch.channels_last)(x)
    model.to(memory_format=torch.contiguous_format)
    assert not _channels_last(model, x)
    assert model.conv.weight.is_contiguous()  # put back as it was
    assert model(x).shape == (8, 10)  # and it still runs


def test_a_model_without_convolutions_is_left_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    assert not _channels_last(model, torch.randn(8, 1, 28, 28))
    assert not _channels_last(nn.Linear(3, 2), torch.randn(8, 3))
