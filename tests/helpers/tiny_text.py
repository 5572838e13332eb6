"""A tiny randomly initialised BERT, a toy sentiment CSV, and a task module on them.

Nothing is downloaded and the packaged MiniLM is not needed: the encoder (2 layers,
hidden 32) is written by transformers from a config, its tokenizer from a 60-word
vocabulary, so a text task trains in seconds through the same code as the real one.
"""

from __future__ import annotations

import csv
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POSITIVE = ("good", "great", "fine", "lovely", "superb", "brilliant", "warm", "fun")
NEGATIVE = ("bad", "awful", "dull", "boring", "poor", "weak", "cold", "tedious")
FILLER = ("the", "film", "movie", "plot", "was", "is", "a", "very", "and", "story", "cast")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_LENGTH = 16
TASK_MODULE = "tiny_text"


def write_encoder(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32, with a pooler) and its WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = (*SPECIAL, *POSITIVE, *NEGATIVE, *FILLER, "!", ".", ",")
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    vocab = {word: i for i, word in enumerate(words)}
    BertTokenizerFast(vocab=vocab).save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(folder))
    return folder


def write_corpus(path: Path, rows: int = 160, seed: int = 0) -> Path:
    """A balanced CSV ``label,text`` (labels ``neg``/``pos``) a small model separates."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        for i in range(rows):
            label = ("neg", "pos")[i % 2]
            cue = POSITIVE if label == "pos" else NEGATIVE
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
            for _ in range(2):
                words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
            out.writerow([label, " ".join(words)])
    return path


def write_task_module(folder: Path, encoder: Path, corpus: Path) -> str:
    """``tiny_text.py`` in ``folder`` defining TASK; returns the ``task`` run-key value."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK_MODULE}.py").write_text(
        "from common.tasks.text import EncoderFiles, TextCsv, text_task\n\n"
        "TASK = text_task(\n"
        "    'tiny-text',\n"
        f"    TextCsv({str(corpus)!r}, label_values=('neg', 'pos'), text_column=1),\n"
        "    class_labels=('negative', 'positive'),\n"
        f"    encoder=EncoderFiles({str(encoder)!r}),\n"
        f"    max_length={MAX_LENGTH},\n"
        "    test_fraction=0.25,\n"
        ")\n"
    )
    return f"{TASK_MODULE}:TASK"


@contextmanager
def importable_tiny_task(root: Path, module: str, corpus_name: str) -> Iterator[Path]:
    """The tiny task importable as ``<module>:TASK`` (its own module name: other test
    files import a tiny text task too) while the block runs; yields its encoder."""
    encoder = write_encoder(root / "encoder")
    write_task_module(root / "code", encoder, write_corpus(root / corpus_name))
    (root / "code" / f"{TASK_MODULE}.py").rename(root / "code" / f"{module}.py")
    sys.path.insert(0, str(root / "code"))
    try:
        yield encoder
    finally:
        sys.path.remove(str(root / "code"))
