"""Task 'fashion-mnist': Zalando's 28x28 clothing images (IDX files) and a tanh CNN.

Debian's ``dataset-fashion-mnist`` package installs the files where this task
finds them without a ``data-dir``.
"""

from __future__ import annotations

from pathlib import Path

from common.data.idx import idx_task
from common.tasks.registry import register_task

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

FASHION_MNIST = register_task(
    idx_task(
        "fashion-mnist",
        class_labels=LABELS,
        mean=0.2860,  # published training-set mean and std
        std=0.3530,
        missing_data_hint="install Debian's 'dataset-fashion-mnist' package (it puts the "
        f"files in {DEFAULT_DIR}) or download them, then set 'data-dir'",
        default_data_dir=DEFAULT_DIR,
    )
)
