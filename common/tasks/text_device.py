"""A text task away from the server: its tokenizer beside the exported model, and a
deployed node's own CSV of texts.

A device predicting on raw text needs exactly the tokenisation the model was trained
with, but not transformers: :func:`export_tokenizer` writes the training tokenizer's
own ``tokenizers`` pipeline (what transformers' fast tokenizer runs) as
``tokenizer.json``, without the truncation and padding settings a hub file may carry,
and returns the ``model.json`` entry that says how to apply it (``max_length``,
padding id, sides) and its SHA-256, which ``client.predict`` checks before use.

A node with its own ``data-path`` reads a CSV laid out as the task's
:class:`~common.tasks.text.TextCsv` (same columns, same label values), tokenised by
the same code as the server's data, with the same refusals naming file and row.

Numpy at most at import, like :mod:`common.tasks.text`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.tasks.text import _TextReader, load_tokenizer, tokenised

if TYPE_CHECKING:
    import numpy as np

    from common.tasks.task import Task

TOKENIZER_FILE = "tokenizer.json"  # beside model.ts


def text_reader(task: Task) -> _TextReader | None:
    """The CSV, encoder and length of a text task; ``None`` for any other task."""
    reader = task.read_raw
    return reader if isinstance(reader, _TextReader) else None


def local_text_rule(reader: _TextReader) -> str:
    """What a text task's node-local ``data-path`` must be (for refusals)."""
    source = reader.source
    values = ", ".join(map(repr, source.label_values))
    header = "a header row, then " if source.header else ""
    return (
        f"node config key 'data-path' of a text task names a CSV file laid out as the "
        f"task's: {header}the text in column {source.text_column} and the label in "
        f"column {source.label_column} (counted from 0), labels one of {values}"
    )


def local_text_sources(reader: _TextReader, path: Path) -> tuple[Path, ...]:
    """The files a node's text shard depends on: the CSV and the tokenizer's files."""
    return (path, *reader.encoder.files())


def read_local_texts(reader: _TextReader, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(N, max_length)`` and int64 labels of a node's own text CSV.

    A bad row is a :class:`~common.data.checks.DataFileError` naming the file, the
    row and the line, exactly as for the server's copy of the task's CSV.
    """
    ids, labels, _ = tokenised(path, reader.source, reader.encoder, reader.max_length)
    return ids, labels


def export_tokenizer(reader: _TextReader, folder: Path) -> dict[str, Any]:
    """Write the task's tokenizer to ``folder/tokenizer.json``; its ``model.json`` entry.

    The file is the training tokenizer's pipeline with truncation and padding off:
    the entry says how to apply them, so a device reproduces the training ids
    exactly (checked against :func:`common.tasks.text.tokenised` in the tests).
    """
    from tokenizers import Tokenizer

    from common.atomic_files import atomic_write_bytes

    tokenizer = load_tokenizer(reader.encoder)
    pipeline = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    pipeline.no_truncation()
    pipeline.no_padding()
    data = pipeline.to_str().encode()
    atomic_write_bytes(folder / TOKENIZER_FILE, data)
    return {
        "file": TOKENIZER_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "library": "tokenizers (Tokenizer.from_file)",
        "max_length": reader.max_length,
        "truncation_side": str(tokenizer.truncation_side),  # what tokenised() cut
        "padding_side": "right",  # tokenised() pads right, to max_length
        "pad_id": int(tokenizer.pad_token_id),
        "pad_token": str(tokenizer.pad_token),
        "special_tokens": True,
        "model_input": "token ids as float32, shape (N, max_length)",
    }
