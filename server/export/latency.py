"""Latency per example of each exported file, measured as ``client.predict`` runs it.

Recorded in ``model.json`` so an operator can compare variants (float32, int8, ...)
without timing them by hand. The measurement is deliberately the simplest one a
device reproduces: the saved TorchScript file, one example per call (batch 1), one
thread, after warm-up calls (TorchScript's profiling executor optimises the graph
during the first calls), and the median of a few dozen timed calls, which a busy
host's outliers do not move. It is the exporting machine's number, not a device's.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from server.export.compression import quiet_quantisation_warnings

WARMUP_CALLS = 5
TIMED_CALLS = 25


def median_latency_ms(path: Path, example: torch.Tensor) -> float:
    """Median milliseconds of one call of the saved file ``path`` on ``example``
    (one example of model input), with one thread, after :data:`WARMUP_CALLS`."""
    with quiet_quantisation_warnings():
        model = torch.jit.load(str(path), map_location="cpu").eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with torch.no_grad():
            for _ in range(WARMUP_CALLS):
                model(example)
            for _ in range(TIMED_CALLS):
                start = time.perf_counter()
                model(example)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return round(1000 * statistics.median(times), 4)


def latency_method() -> dict[str, Any]:
    """How ``latency_ms_per_example`` of every variant in ``model.json`` was measured."""
    return {
        "statistic": f"median of {TIMED_CALLS} timed calls after {WARMUP_CALLS} "
        "warm-up calls",
        "batch": 1,
        "threads": 1,
        "input": "the first example of the server's test set, as model input",
        "clock": "time.perf_counter around model(x), torch.no_grad, the saved file "
        "loaded by torch.jit.load",
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        "note": "measured on the exporting host at export time (it may be busy); "
        "a device's latency differs",
    }
