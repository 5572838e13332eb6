"""Central evaluation of the global model on the server's held-out test set."""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.data.datasets import load_test_split
from common.data.features import compute_features
from common.tasks.models import build_run_model
from common.tasks.registry import get_task
from common.tasks.scoring import evaluate_task


class CentralEvaluator:
    """Scores global weights on the test split, which no client ever trains on."""

    def __init__(self, cfg: RunConfig) -> None:
        self.task = cfg.task
        x_test, y_test = load_test_split(cfg.task, cfg.data_dir, cfg.seed)
        self.x_test = compute_features(cfg.features, torch.from_numpy(x_test))
        self.y_test = torch.from_numpy(y_test)
        self.num_classes = get_task(cfg.task).num_classes
        self.model = build_run_model(cfg, self.num_classes)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Loss and the task's metrics (common.tasks.scoring) of ``arrays``."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        # Every core while it runs: the clients wait for the next round meanwhile.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        try:
            return evaluate_task(self.task, self.model, self.x_test, self.y_test)
        finally:
            torch.set_num_threads(threads)
