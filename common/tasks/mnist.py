"""Task 'mnist': LeCun's 28x28 handwritten digits (IDX files) and a tanh CNN."""

from __future__ import annotations

from common.data.idx import idx_task
from common.tasks.registry import register_task

MNIST = register_task(
    idx_task(
        "mnist",
        class_labels=tuple(str(i) for i in range(10)),
        mean=0.1307,  # published training-set mean and std
        std=0.3081,
        missing_data_hint="download the four MNIST IDX .gz files and set 'data-dir' to "
        "their directory",
    )
)
