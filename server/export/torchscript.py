"""Export the global model for on-device inference: TorchScript plus metadata.

``model.json`` records, per variant, its size, accuracy on the server's test set
and median latency per example (:mod:`server.export.latency`); a text task's
tokenizer is written beside the model (``tokenizer.json``) so a device predicts
on raw text (:mod:`common.tasks.text_device`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.atomic_files import atomic_write_bytes
from common.config import ConfigError, RunConfig
from common.data.datasets import load_test_split
from common.data.features import ScatteringFront
from common.tasks.models import build_run_model
from common.tasks.registry import get_task, is_task_reference
from common.tasks.text_device import export_tokenizer, text_reader
from server.export.compression import (
    VARIANT_FILES,
    compress,
    describe,
    quiet_quantisation_warnings,
    script_variant,
)
from server.export.latency import latency_method, median_latency_ms


def _export_form(
    model: torch.nn.Module, cfg: RunConfig
) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """The module written to disk and, for one that is traced, its example input.

    A model with ``export_module`` (a LoRA text model: adapters merged into the
    frozen encoder, common/tasks/text_models.py) is traced, as transformers'
    encoders cannot be scripted; any other model is scripted.
    """
    if hasattr(model, "export_module"):
        length = get_task(cfg.task).input_shape[-1]
        return model.export_module(), model.example_input(length)
    return model, None


def _trace(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module.eval(), example, check_trace=False)


def _to_torchscript(
    model: torch.nn.Module, cfg: RunConfig, example: torch.Tensor | None = None
) -> torch.jit.ScriptModule:
    """Script the model; a feature map is traced in front, so it takes raw images."""
    if example is not None:
        return _trace(model, example)
    if cfg.features == "pixels":
        return torch.jit.script(model)
    side = get_task(cfg.task).preprocessing.side  # type: ignore[union-attr]  # 28x28 only
    full = torch.nn.Sequential(ScatteringFront(side), model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(full, torch.zeros(2, 1, side, side), check_trace=False)


def check_exportable(cfg: RunConfig) -> None:
    """Refuse (``ConfigError``) before round 1 a user's task whose model the export
    could not script, so a run does not fail after its training.

    Built-in tasks are exported by the tests; a ``module:attribute`` task's model is
    scripted here once, with the run's compression.
    """
    if not is_task_reference(cfg.task):
        return
    model, example = _export_form(build_run_model(cfg).eval(), cfg)
    step = "TorchScript (model.ts)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _to_torchscript(model, cfg, example)
            if cfg.export_compression != "none":
                step = f"export-compression {cfg.export_compression!r}"
                with quiet_quantisation_warnings():
                    compressed = compress(model, cfg.export_compression)
                    if example is None:
                        script_variant(compressed, None)
                    else:
                        _trace(compressed, example)
    except Exception as exc:
        raise ConfigError(
            f"run config keys 'task' and 'export-compression': the model of task "
            f"{cfg.task!r} cannot be exported as {step} at the end of the run: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(make the model scriptable, or set export-compression = 'none')"
        ) from None


def _save(scripted: torch.jit.ScriptModule, path: Path) -> None:
    """Save TorchScript atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    scripted.save(str(tmp))
    tmp.replace(path)


def export_model(
    arrays: ArrayRecord, cfg: RunConfig, out_dir: Path, extra: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``model.ts`` (TorchScript), the compressed variant, and ``model.json``.

    Every file written is scored on the server's test set as saved, so the accuracy
    in ``model.json`` is what ``client.predict`` gets from that file.
    """
    model = build_run_model(cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    model, example = _export_form(model.eval(), cfg)
    parameters = sum(p.numel() for p in model.parameters())  # all, frozen ones too
    task = get_task(cfg.task)
    front = ScatteringFront(task.input_shape[-1]) if cfg.features != "pixels" else None
    ts_path = out_dir / VARIANT_FILES["float32"]
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is what
        # runs on CPU-only edge installs without the model's Python code.
        warnings.simplefilter("ignore", DeprecationWarning)
        _save(_to_torchscript(model, cfg, example), ts_path)
    written = {"float32": (ts_path, model)}
    if cfg.export_compression != "none":
        compressed = compress(model, cfg.export_compression)
        path = out_dir / VARIANT_FILES[cfg.export_compression]
        with quiet_quantisation_warnings():
            traced = _trace(compressed, example) if example is not None else None
            _save(traced or script_variant(compressed, front), path)
        written[cfg.export_compression] = (path, compressed)
    x_test, y_test = load_test_split(cfg.task, cfg.data_dir, cfg.seed)
    test_set = (torch.from_numpy(x_test), torch.from_numpy(y_test))
    threads = torch.get_num_threads()
    # The run's thread count (the ServerApp sets it too): the traced kymatio front is
    # thousands of small ops, which ran 10x slower with 2 threads on a busy 2-core host.
    torch.set_num_threads(cfg.torch_threads)
    try:
        reports = {
            name: describe(name, path, eager, test_set, parameters, front is not None)
            for name, (path, eager) in written.items()
        }
    finally:
        torch.set_num_threads(threads)
    latency = {
        name: median_latency_ms(path, test_set[0][:1])
        for name, (path, _) in written.items()
    }
    spec = task.export_spec()  # labels, shapes and preprocessing: the task's facts
    reader = text_reader(task)
    if reader is not None:  # raw text on a device: the training tokenizer, beside
        spec["tokenizer"] = export_tokenizer(reader, out_dir)
    meta = {
        "format": "privfed-torchscript/1",
        "task": cfg.task,
        **spec,
        "features": cfg.features,  # a feature map is part of every model file
        "note": spec["preprocessing"]["note"],
        "export_compression": cfg.export_compression,
        "variants": {
            name: {
                **report.as_json(None if name == "float32" else reports["float32"]),
                "latency_ms_per_example": latency[name],
            }
            for name, report in reports.items()
        },
        "latency": latency_method(),
        **extra,
    }
    meta_path = out_dir / "model.json"
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return ts_path, meta_path
