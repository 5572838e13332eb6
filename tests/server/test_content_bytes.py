"""Message bytes: a size remembered by object ID is the size Flower would send."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

import server.messaging as messaging
from server.messaging import content_bytes


def _deflated(content: RecordDict) -> int:
    """What Flower sends: every nested object deflated, counted afresh."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())


def test_a_shared_model_is_counted_as_sent_for_every_message() -> None:
    model = ArrayRecord({"w": Array(np.ones((40, 30), dtype=np.float32))})
    contents = [
        RecordDict({"arrays": model, "config": ConfigRecord({"partition": p})})
        for p in range(5)
    ]
    sizes = [content_bytes(c) for c in contents]
    assert sizes == [_deflated(c) for c in contents]
    assert sizes[0] > 40 * 30 * 4  # the model's bytes are in every message's count


def test_a_model_changed_in_place_is_counted_at_its_new_size() -> None:
    model = ArrayRecord({"w": Array(np.ones((4, 3), dtype=np.float32))})
    before = content_bytes(RecordDict({"arrays": model}))
    model["w"] = Array(np.ones((400, 3), dtype=np.float32))
    after = content_bytes(RecordDict({"arrays": model}))
    assert after == _deflated(RecordDict({"arrays": model}))
    assert after - before >= (400 - 4) * 3 * 4  # the new rows, and a longer header


def test_the_remembered_sizes_stay_bounded(monkeypatch) -> None:
    monkeypatch.setattr(messaging, "_SIZES", {})
    monkeypatch.setattr(messaging, "_SIZES_KEPT", 8)
    for p in range(50):
        content = RecordDict({"config": ConfigRecord({"partition": p})})
        assert content_bytes(content) == _deflated(content)
    assert len(messaging._SIZES) <= 8
