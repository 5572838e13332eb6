"""Compressed export variants: int8 weights, optional magnitude pruning, fp16 wavelets.

Compressing the trained global model is post-processing of a DP result, so it costs
no privacy. Every variant is TorchScript that ``client.predict`` loads without the
training code:

- ``int8``: Linear layers by PyTorch's dynamic quantisation (int8 weights, activations
  quantised per call); Conv2d weights stored int8 per output channel and widened to
  float32 in ``forward`` (weight-only: dynamic quantisation has no Conv2d, and static
  quantisation would need calibration data that is private).
- ``int8+prune``: the same after per-layer L1 (magnitude) pruning of
  :data:`PRUNE_AMOUNT` of every Linear and Conv2d weight.

With ``features = "scattering"``, ``model.ts`` (462 kB) is the kymatio front traced
in front of the linear model: 159 kB of float32 weights, 89 kB of float32 wavelet
filters, and 203 kB of traced code with its debug records (the trace unrolls every
FFT path). Measured: int8 weights behind the same trace give 346 kB (1.3x smaller);
so the variants script :class:`common.data.scattering_port.ScriptedScattering`, an
exact port of kymatio's scattering loop (13 kB of code), which with float32 filters
gives 150 kB (3.1x) and with the filters stored float16, as here, 105 kB (4.4x).
"""

from __future__ import annotations

import copy
import gzip
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import quantize_dynamic
from torch.ao.quantization.observer import PerChannelMinMaxObserver
from torch.nn.utils import prune

from common.data.features import ScatteringFront
from common.data.scattering_port import ScriptedScattering
from common.run_keys import EXPORT_COMPRESSIONS

PRUNE_AMOUNT = 0.5  # share of each Linear/Conv2d weight zeroed by "int8+prune"
VARIANT_FILES = {
    "float32": "model.ts",
    "int8": "model-int8.ts",
    "int8+prune": "model-int8-pruned.ts",
}
_EVAL_CHUNK = 256  # test images per forward call (the traced kymatio front slows past it)


@contextmanager
def quiet_quantisation_warnings() -> Iterator[None]:
    """Hide torch's deprecation notices for quantisation and TorchScript.

    ``torch.ao.quantization``, quantised tensors and TorchScript are deprecated in
    torch 2.13 (in favour of torchao and torch.export, which do not give a file that
    runs without the model's code); the notices would print on every export.
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, UserWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=".*deprecated.*", category=category)
        # The quantised-tensor notice is once per process; spent here, Python filters
        # it, while one raised inside torch.jit.load would go straight to stderr.
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.qint8)
        yield


class Int8WeightConv2d(nn.Module):
    """A Conv2d whose weight is stored int8 per output channel (symmetric), bias float32."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if (
            conv.groups != 1
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
        ):
            raise ValueError(
                "Int8WeightConv2d supports plain zero-padded, ungrouped Conv2d"
            )
        weight = conv.weight.detach()
        observer = PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
        observer(weight)
        scale, _ = observer.calculate_qparams()
        scale = scale.float().reshape(-1, 1, 1, 1)
        self.register_buffer(
            "weight_int8", (weight / scale).round().clamp(-127, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale)
        bias = (
            conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        )
        self.register_buffer("bias", bias.clone())
        self.stride: list[int] = list(conv.stride)
        self.padding: list[int] = list(conv.padding)
        self.dilation: list[int] = list(conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the weight widened back to float32."""
        weight = self.weight_int8.float() * self.scale
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)


def _prune(model: nn.Module, amount: float) -> None:
    """Zero the smallest-magnitude ``amount`` of each Linear/Conv2d weight, permanently."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(module, "weight", amount=amount)
            prune.remove(module, "weight")


def _quantise(model: nn.Module) -> nn.Module:
    """Conv2d to int8 weight-only; Linear to dynamic int8 (PyTorch's own)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(model, name, Int8WeightConv2d(child))
        else:
            _quantise(child)
    return model


def compress(model: nn.Module, method: str) -> nn.Module:
    """An eager copy of ``model`` compressed by ``method`` (``model`` is left as it is)."""
    if method not in EXPORT_COMPRESSIONS or method == "none":
        allowed = ", ".join(repr(c) for c in EXPORT_COMPRESSIONS if c != "none")
        raise ValueError(
            f"run config key 'export-compression': no compressed variant {method!r}; "
            f"allowed: {allowed}"
        )
    work = copy.deepcopy(model).eval()
    if method == "int8+prune":
        _prune(work, PRUNE_AMOUNT)
    _quantise(work)
    with quiet_quantisation_warnings():
        return quantize_dynamic(work, {nn.Linear}, dtype=torch.qint8)


def script_variant(
    compressed: nn.Module, front: ScatteringFront | None
) -> torch.jit.ScriptModule:
    """TorchScript of a compressed model, with the fp16 scattering front if ``front``."""
    full = (
        compressed
        if front is None
        else nn.Sequential(ScriptedScattering(front, torch.float16), compressed)
    )
    with quiet_quantisation_warnings():
        return torch.jit.script(full.eval())


def weight_stats(model: nn.Module) -> tuple[int, int]:
    """``(weights, zero weights)`` over every Linear/Conv2d weight as it is stored."""
    total = zeros = 0
    for module in model.modules():
        weight: torch.Tensor | None = None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight.detach()
        elif isinstance(module, Int8WeightConv2d):
            weight = module.weight_int8
        elif isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            with quiet_quantisation_warnings():
                weight = module.weight().int_repr()
        if weight is not None:
            total += weight.numel()
            zeros += int((weight == 0).sum())
    return total, zeros


@dataclass(frozen=True)
class VariantReport:
    """What ``model.json`` records for one exported file, measured after compression."""

    name: str
    file: str
    bytes: int
    gzip_bytes: int
    parameters: int
    weight_sparsity: float
    dtype: str
    accuracy: float
    test_examples: int

    def __post_init__(self) -> None:
        if self.name not in VARIANT_FILES or VARIANT_FILES[self.name] != self.file:
            raise ValueError(
                f"variant {self.name!r}: file must be {VARIANT_FILES.get(self.name)}"
            )
        if min(self.bytes, self.gzip_bytes, self.parameters, self.test_examples) <= 0:
            raise ValueError(f"variant {self.name!r}: sizes and counts must be > 0")
        if not (0 <= self.weight_sparsity <= 1 and 0 <= self.accuracy <= 1):
            raise ValueError(
                f"variant {self.name!r}: sparsity and accuracy must be in [0, 1]"
            )

    def as_json(self, reference: VariantReport | None) -> dict[str, object]:
        """The ``model.json`` entry; size factor and accuracy change vs ``reference``."""
        entry: dict[str, object] = {
            "file": self.file,
            "bytes": self.bytes,
            "gzip_bytes": self.gzip_bytes,
            "parameters": self.parameters,
            "weight_sparsity": round(self.weight_sparsity, 6),
            "dtype": self.dtype,
            "accuracy": self.accuracy,
            "test_examples": self.test_examples,
        }
        if reference is not None:
            entry["size_factor"] = round(reference.bytes / self.bytes, 4)
            entry["accuracy_change_points"] = round(
                100 * (self.accuracy - reference.accuracy), 4
            )
        return entry


DTYPES = {
    "float32": "float32 weights and activations",
    "int8": "int8 weights (Linear: dynamic quantisation, Conv2d: weight-only per channel), "
    "float32 activations",
    "int8+prune": f"int8 weights as 'int8' after L1 pruning of {PRUNE_AMOUNT:.0%} of each "
    "Linear/Conv2d weight, float32 activations",
}
SCATTERING_NOTE = "; wavelet filters float16"


def scripted_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the saved TorchScript file ``path`` on normalised images ``x``."""
    with quiet_quantisation_warnings():
        model = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(1) for chunk in x.split(_EVAL_CHUNK)])
    return float((predicted == y).double().mean())


def describe(
    name: str,
    path: Path,
    model: nn.Module,
    test_set: tuple[torch.Tensor, torch.Tensor],
    parameters: int,
    scattering: bool,
) -> VariantReport:
    """Measure one saved variant (``model``: its eager form, for the stored weights)."""
    data = path.read_bytes()
    total, zeros = weight_stats(model)
    x, y = test_set
    return VariantReport(
        name=name,
        file=path.name,
        bytes=len(data),
        gzip_bytes=len(gzip.compress(data, compresslevel=9, mtime=0)),
        parameters=parameters,
        weight_sparsity=zeros / total if total else 0.0,
        dtype=DTYPES[name] + (SCATTERING_NOTE if scattering and name != "float32" else ""),
        accuracy=scripted_accuracy(path, x, y),
        test_examples=len(y),
    )  # fmt: skip
