"""Binary metrics equal scikit-learn's own; tabular models train under direct DP-SGD."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)
from torch import nn

from client.training.per_sample_grads import PerSampleClipper
from common.tasks.csv_table import tabular_model
from common.tasks.metrics import evaluate_binary_model, evaluate_model
from common.tasks.tabular_models import MODELS


class _Fixed(nn.Module):
    """Returns the given logits, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def _case(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 2, generator=g, dtype=torch.float64).float()
    y = (torch.rand(n, generator=g) < torch.softmax(logits, 1)[:, 1]).long()
    return torch.arange(n, dtype=torch.float32)[:, None], y, logits


def test_binary_metrics_match_scikit_learn() -> None:
    x, y, logits = _case()
    got = evaluate_binary_model(_Fixed(logits), x, y, batch_size=64)
    p = torch.softmax(logits, 1)[:, 1].double().numpy()
    truth, predicted = y.numpy(), (p >= 0.5).astype(int)
    assert got["auroc"] == pytest.approx(roc_auc_score(truth, p))
    assert got["auprc"] == pytest.approx(average_precision_score(truth, p))
    assert got["brier"] == pytest.approx(brier_score_loss(truth, p))
    assert got["loss"] == pytest.approx(log_loss(truth, p), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float((predicted == truth).mean()))
    assert got["precision"] == pytest.approx(precision_score(truth, predicted))
    assert got["recall"] == pytest.approx(recall_score(truth, predicted))
    assert got["f1"] == pytest.approx(f1_score(truth, predicted))
    assert 0 <= got["ece"] <= 1
    assert set(evaluate_model(_Fixed(logits), x, y, 2)) <= set(got)  # same keys, and more


def test_one_logit_models_are_read_as_the_positive_logit() -> None:
    x, y, logits = _case(seed=1)
    margin = (logits[:, 1] - logits[:, 0])[:, None]
    two = evaluate_binary_model(_Fixed(logits), x, y)
    one = evaluate_binary_model(_Fixed(margin), x, y)
    for key in two:
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), key


def test_a_one_class_test_set_gives_nan_ranking_metrics() -> None:
    x, _, logits = _case(n=20)
    got = evaluate_binary_model(_Fixed(logits), x, torch.zeros(20, dtype=torch.long))
    assert math.isnan(got["auroc"]) and math.isnan(got["auprc"])
    assert not math.isnan(got["brier"]) and not math.isnan(got["loss"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tabular_models_take_records_and_direct_per_sample_clipping(name: str) -> None:
    torch.manual_seed(0)
    model = tabular_model(name, 7)(2, "pixels")  # the Task's (num_classes, features)
    x, y = torch.rand(16, 7), torch.randint(0, 2, (16,))
    assert model(x).shape == (16, 2)
    assert all(isinstance(m, (nn.Linear, nn.Tanh, nn.Sequential)) for m in model.modules()
               if m is not model)  # fmt: skip
    clipper = PerSampleClipper(model)  # refuses any layer it cannot clip per sample
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    sums = clipper.clipped_sums(loss, 1.0)
    clipper.close()
    assert set(sums) == set(model.parameters())
    # each record's clipped gradient has norm <= 1, so their sum is <= 16
    total = math.sqrt(sum(float((s**2).sum()) for s in sums.values()))
    assert total <= 16 + 1e-4
    with pytest.raises(ValueError, match="2 classes"):
        MODELS[name](7, 1)
