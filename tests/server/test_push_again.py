"""A push that Flower's push-session mix-up broke is pushed again, not the run lost."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

import server.messaging as messaging
from server.messaging import PUSH_ATTEMPTS, CountingGrid
from tests.helpers.messages import pushed_instruction


class _LosingGrid:
    """Raises Flower's ObjectPushError on the first ``failures`` pushes."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def push_messages(self, messages: Any) -> list[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ObjectPushError("abc", 7, "session-1")
        return [f"m{i}" for i in range(len(list(messages)))]


def _content() -> RecordDict:
    return RecordDict({"config": ConfigRecord({"server-round": 3})})


def _messages() -> list[Message]:
    return [pushed_instruction(13, _content()), pushed_instruction(14, _content())]


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messaging.time, "sleep", lambda _s: None)


def test_a_lost_push_session_is_pushed_again_and_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = _LosingGrid(failures=2)
    grid = CountingGrid(inner)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        ids = grid.push_messages(_messages())
    assert ids == ["m0", "m1"] and inner.calls == 3
    assert set(grid.down) == {13, 14}  # bytes counted once, not per attempt
    assert grid.down[13] == messaging.content_bytes(_content()) > 0
    assert "pushing 2 messages failed" in caplog.text
    assert "attempt 3 of" in caplog.text


def test_a_push_that_keeps_failing_still_fails_the_round() -> None:
    inner = _LosingGrid(failures=PUSH_ATTEMPTS)
    with pytest.raises(ObjectPushError):
        CountingGrid(inner).push_messages(_messages())  # type: ignore[arg-type]
    assert inner.calls == PUSH_ATTEMPTS
