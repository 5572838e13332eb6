"""Raw text to a text model's input on a device, for :mod:`client.predict`.

The exporter writes the training tokenizer beside ``model.ts`` and records in
``model.json`` (``tokenizer``) its SHA-256 and how to apply it; this module checks
that file, tokenises with the ``tokenizers`` package alone (imported here, so only
text models need it) and reads the CSV a device predicts on:

- a header row naming a ``text`` column (required) and a ``label`` column
  (optional; then the accuracy is printed);
- a label is a class name as ``model.json`` lists it (``negative``) or a class
  index (``0``): the names are what ``client.predict`` prints, the indices what
  it prints beside them.

Every refusal names the file, and the row, line and column where one is at fault.
Imports no privfed training code, nor torch.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
_CSV_RULE = (
    f"a CSV whose header names a '{TEXT_COLUMN}' column (and optionally a "
    f"'{LABEL_COLUMN}' column), then one example per row"
)


def read_text_csv(path: Path, classes: list[str]) -> tuple[list[str], np.ndarray | None]:
    """The texts of ``path`` and, with a ``label`` column, their class indices."""
    by_name = {name: i for i, name in enumerate(classes)}
    allowed = (
        f"a class name ({', '.join(map(repr, classes))}) or a class index "
        f"0..{len(classes) - 1}"
    )
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = [name.strip() for name in next(reader, [])]
        if TEXT_COLUMN not in header:
            raise ValueError(
                f"{path}: the header has no '{TEXT_COLUMN}' column (it names "
                f"{', '.join(map(repr, header)) or 'nothing'}); {_CSV_RULE}"
            )
        text_at = header.index(TEXT_COLUMN)
        label_at = header.index(LABEL_COLUMN) if LABEL_COLUMN in header else None
        line, number = reader.line_num + 1, 0
        for row in reader:
            where, line = f"{path}: row {number + 1} (line {line})", reader.line_num + 1
            if not row:  # a blank line
                continue
            number += 1
            if len(row) < len(header):
                raise ValueError(
                    f"{where}: {len(row)} columns, the header names {len(header)}"
                )
            text = row[text_at].strip()
            if not text:
                raise ValueError(f"{where}, column '{TEXT_COLUMN}': the text is empty")
            texts.append(text)
            if label_at is not None:
                labels.append(_label(row[label_at].strip(), by_name, where, allowed))
    if not texts:
        raise ValueError(f"{path}: holds no texts; {_CSV_RULE}")
    return texts, (np.asarray(labels, dtype=np.int64) if label_at is not None else None)


def _label(value: str, by_name: dict[str, int], where: str, allowed: str) -> int:
    if value in by_name:
        return by_name[value]
    if value.isdigit() and int(value) < len(by_name):
        return int(value)
    raise ValueError(
        f"{where}, column '{LABEL_COLUMN}': unknown label {value!r}; allowed: {allowed}"
    )


def load_tokenizer(model_path: Path, entry: dict[str, Any]) -> Any:
    """The exported tokenizer beside ``model_path``, checked against ``model.json``
    and set to truncate and pad as the model was trained."""
    path = model_path.with_name(entry["file"])
    described = model_path.with_name("model.json")
    if not path.is_file():
        raise ValueError(
            f"{path}: tokenizer file is missing; {described} names it: copy it from "
            "the export folder beside the model file"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(
            f"{path}: tokenizer file does not match the SHA-256 {described} records "
            f"(expected {entry['sha256']}, got {digest}); copy the export's own file"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RuntimeError(
            "a text model needs the 'tokenizers' package: pip install tokenizers"
        ) from exc
    tokenizer = Tokenizer.from_file(str(path))
    length = int(entry["max_length"])
    tokenizer.enable_truncation(length, direction=entry.get("truncation_side", "right"))
    tokenizer.enable_padding(
        direction=entry.get("padding_side", "right"),
        pad_id=int(entry["pad_id"]),
        pad_token=entry["pad_token"],
        length=length,
    )
    return tokenizer


def text_input(model_path: Path, entry: dict[str, Any], texts: list[str]) -> np.ndarray:
    """Token ids ``(N, max_length)`` as float32: the model's input."""
    tokenizer = load_tokenizer(model_path, entry)
    encoded = tokenizer.encode_batch(texts, add_special_tokens=entry["special_tokens"])
    return np.asarray([e.ids for e in encoded], dtype=np.float32)
