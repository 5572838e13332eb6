"""Central evaluation of the global model on the server's held-out test set."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.data.datasets import load_dataset
from common.data.features import compute_features
from common.tasks.metrics import evaluate_model
from common.tasks.models import build_model


class CentralEvaluator:
    """Scores global weights on the test split, which no client ever trains on."""

    def __init__(self, cfg: RunConfig) -> None:
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.seed)
        self.x_test = compute_features(cfg.features, torch.from_numpy(data.x_test))
        self.y_test = torch.from_numpy(data.y_test)
        self.num_classes = data.num_classes
        self.model = build_model(cfg.dataset, data.num_classes, features=cfg.features)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Loss, accuracy and macro precision/recall/F1 of ``arrays``."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate_model(self.model, self.x_test, self.y_test, self.num_classes)
