"""PrivateFedAvg: averages trained replies only, records refusals and failures."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message

import client.app as client_app
from common.config import RunConfig
from common.tasks.models import build_model
from common.wire.reply_fields import Status
from server.app import make_strategy
from server.federation_loop import LoopState, RoundFailed, check_round, exchange
from server.messaging import LOCAL_POLL_S, REMOTE_POLL_S, WrappedGrid
from server.results.client_outcomes import ClientOutcome
from server.strategies.private_fedavg import PrivateFedAvg
from tests.helpers.messages import make_context, train_message

F32 = {"update_compression": "none"}  # float32 replies, averaged by hand below


def _replies(cfg: RunConfig, server_round: int, contexts: list) -> list[Message]:
    """Real ClientApp replies; the configs below send float32 weights
    (``update-compression = "none"``), which these tests average by hand."""
    arrays = ArrayRecord(build_model("digits", seed=0).state_dict())
    return [
        client_app.train(train_message(arrays, server_round, node_id=ctx.node_id), ctx)
        for ctx in contexts
    ]


def test_refused_and_failed_replies_are_not_averaged() -> None:
    """Only 'trained' replies enter the average, by planning count; all are recorded."""
    cfg = RunConfig(**F32, num_rounds=2, target_epsilon=0.0, noise_multiplier=1.0)
    tight = RunConfig(
        num_rounds=2, target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=0.01
    )
    contexts = [make_context(cfg, pid, 4, node_id=10 + pid) for pid in (0, 1)]
    refusing = make_context(tight, 2, 4, node_id=12)
    replies = _replies(cfg, 1, contexts) + _replies(tight, 1, [refusing])
    instruction = train_message(ArrayRecord(build_model("digits").state_dict()), 1, 13)
    replies.append(Message(Error(code=0, reason="boom"), reply_to=instruction))

    strategy = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
    arrays, metrics = strategy.aggregate_train(1, replies)
    statuses = sorted(o.status for o in strategy.last_outcomes)
    assert statuses == sorted(
        [Status.TRAINED, Status.TRAINED, Status.BUDGET_EXHAUSTED, Status.ERROR]
    )
    assert arrays is not None and metrics is not None

    # A private reply is weighted by its planning count (in a simulation: N itself).
    trained = replies[:2]
    weights = [float(r.content["report"]["planning-records"]) for r in trained]
    assert weights == [360.0, 359.0]  # 1,437 training digits in 4 shards
    assert all("num-examples" not in r.content["report"] for r in trained)
    key = next(iter(arrays.keys()))
    expected = sum(
        w * r.content["arrays"][key].numpy() for w, r in zip(weights, trained, strict=True)
    ) / sum(weights)
    np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)

    refused = next(o for o in strategy.last_outcomes if o.status is Status.BUDGET_EXHAUSTED)
    assert refused.partition_id == 2 and refused.epsilon == 0.0
    failed = next(o for o in strategy.last_outcomes if o.status is Status.ERROR)
    assert failed.reason == "boom" and failed.node_id == 13


def test_non_private_replies_are_weighted_by_examples() -> None:
    """A non-private run (num-examples released) averages example-weighted."""
    cfg = RunConfig(**F32, num_rounds=2, privacy_mode="none", target_epsilon=0.0)
    contexts = [make_context(cfg, pid, 4, node_id=50 + pid) for pid in (0, 3)]
    replies = _replies(cfg, 1, contexts)
    strategy = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    weights = [float(o.num_examples or 0) for o in strategy.last_outcomes]
    assert weights[0] != weights[1]  # 1,437 training digits in 4 shards: 360 and 359
    key = next(iter(arrays.keys()))
    expected = sum(
        w * r.content["arrays"][key].numpy() for w, r in zip(weights, replies, strict=True)
    ) / sum(weights)
    np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    losses = [o.train_loss or 0.0 for o in strategy.last_outcomes]
    assert metrics["train-loss"] == pytest.approx(
        sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    )


def test_all_refused_gives_no_new_model() -> None:
    """A round in which nobody trains keeps the previous global model."""
    tight = RunConfig(
        num_rounds=2, target_epsilon=0.0, noise_multiplier=1.0, epsilon_budget=0.01
    )
    replies = _replies(tight, 1, [make_context(tight, pid, 2, 20 + pid) for pid in (0, 1)])
    strategy = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
    assert strategy.aggregate_train(1, replies) == (None, None)
    state = LoopState()
    state.record(strategy.last_outcomes)
    assert state.refusals == 2
    assert state.all_exhausted([20, 21])
    assert not state.all_exhausted([20, 21, 22])  # node 22 has not refused yet


def test_replies_are_summed_in_partition_order_not_arrival_order() -> None:
    """Floating-point sums depend on their order: the same replies arriving in another
    order give a bit-identical model, so two reproducible-noise runs stay identical."""
    cfg = RunConfig(**F32, num_rounds=2, reproducible_noise=True)
    contexts = [make_context(cfg, pid, 5, node_id=70 - pid) for pid in range(5)]
    replies = _replies(cfg, 1, contexts)
    models = []
    for order in (replies, replies[::-1], replies[2:] + replies[:2]):
        strategy = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
        arrays, _ = strategy.aggregate_train(1, order)
        assert arrays is not None
        assert [o.partition_id for o in strategy.last_outcomes] == [0, 1, 2, 3, 4]
        models.append([a.numpy().tobytes() for a in arrays.values()])
    assert models[0] == models[1] == models[2]


def test_loop_state_tracks_max_cumulative_epsilon() -> None:
    """max_epsilon is over every client seen, and failures keep older privacy data."""
    cfg = RunConfig(**F32, num_rounds=3, target_epsilon=0.0, noise_multiplier=1.0)
    contexts = [make_context(cfg, pid, 4, node_id=30 + pid) for pid in (0, 1)]
    strategy = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
    state = LoopState()
    strategy.aggregate_train(1, _replies(cfg, 1, contexts))
    state.record(strategy.last_outcomes)
    first = state.max_epsilon()
    strategy.aggregate_train(2, _replies(cfg, 2, contexts[:1]))
    state.record(strategy.last_outcomes)
    assert state.max_epsilon() == pytest.approx(state.latest[30].epsilon)
    assert state.max_epsilon() > first
    assert state.latest[31].rounds_trained == 1


def test_round_with_only_failures_fails_the_run() -> None:
    """A round in which every client failed (or none replied) is an error, not a pass."""
    failed = [ClientOutcome(node_id=1, status=Status.ERROR, reason="ImportError: x")]
    with pytest.raises(RoundFailed, match="all 1 clients failed; first error: ImportError"):
        check_round(3, failed, len(failed))
    with pytest.raises(RoundFailed, match="no client replied"):
        check_round(3, [], 2)
    refused = ClientOutcome(node_id=2, status=Status.BUDGET_EXHAUSTED)
    check_round(3, [*failed, refused], 3)  # a refusal is a valid answer


def test_server_momentum_applies_fedavgm_to_the_trained_average() -> None:
    """server-learning-rate η and server-momentum β: x ← x − η·m, m ← β·m + (x − avg)."""
    cfg = RunConfig(
        **F32, num_rounds=2, target_epsilon=0.0, noise_multiplier=1.0,
        server_learning_rate=1.5, server_momentum=0.5,
    )  # fmt: skip
    contexts = [make_context(cfg, pid, 3, node_id=40 + pid) for pid in (0, 1)]
    replies = _replies(cfg, 1, contexts)
    strategy = make_strategy(cfg)
    initial = ArrayRecord(build_model("digits", seed=0).state_dict())
    strategy.current_arrays = initial  # what configure_train records in round 1
    strategy.round_arrays = initial  # the model sent, for update validation
    plain = PrivateFedAvg(min_available_nodes=1, min_train_nodes=1)
    average, _ = plain.aggregate_train(1, replies)
    assert average is not None
    key = next(iter(average.keys()))
    x0, avg = initial[key].numpy(), average[key].numpy()

    first, _ = strategy.aggregate_train(1, replies)
    m1 = x0 - avg
    x1 = x0 - 1.5 * m1
    np.testing.assert_allclose(first[key].numpy(), x1, rtol=1e-5, atol=1e-6)
    strategy.validator = None  # a replayed round-1 reply is rejected in round 2
    second, _ = strategy.aggregate_train(2, replies)  # same updates again
    m2 = 0.5 * m1 + (x1 - avg)
    np.testing.assert_allclose(second[key].numpy(), x1 - 1.5 * m2, rtol=1e-5, atol=1e-5)


class _SlowGrid:
    """Replies to message i become available at pull number ``ready[i]``."""

    def __init__(self, ready: list[int]) -> None:
        self.ready, self.pulls = ready, 0

    def push_messages(self, messages: object) -> list[str]:
        return [f"m{i}" for i in range(len(self.ready))]

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
            for i, at in enumerate(self.ready)
            if at == self.pulls and f"m{i}" in ids
        ]


def test_exchange_collects_every_reply_without_fixed_sleeps() -> None:
    """All replies are gathered across pulls; polling starts at tens of milliseconds."""
    grid = _SlowGrid([1, 3, 3, 5])
    started = time.monotonic()
    replies = exchange(grid, [], timeout=30)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == [
        "m0", "m1", "m2", "m3",
    ]  # fmt: skip
    assert grid.pulls == 5
    assert time.monotonic() - started < 0.5  # Flower's HttpGrid would sleep 12 s


class _TimedGrid(_SlowGrid):
    """A :class:`_SlowGrid` that notes when each pull came."""

    def __init__(self, ready: list[int], in_process: bool) -> None:
        super().__init__(ready)
        self.times: list[float] = []
        if in_process:
            self.state = object()  # as Flower's simulation grid holds its link state

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        self.times.append(time.monotonic())
        return super().pull_messages(ids)


@pytest.mark.parametrize("in_process", [True, False])
def test_exchange_polls_a_simulations_link_state_more_often(in_process: bool) -> None:
    """A reply in a simulation's link state (this process) is pulled within 10 ms of
    arriving; a SuperLink's grid, a network call, is pulled up to 0.1 s apart."""
    inner = _TimedGrid([12], in_process)
    replies = exchange(WrappedGrid(inner), [], timeout=30)  # type: ignore[arg-type]
    assert len(replies) == 1 and inner.pulls == 12
    longest = max(b - a for a, b in zip(inner.times, inner.times[1:], strict=False))
    if in_process:
        assert longest < LOCAL_POLL_S + 0.03
    else:
        assert REMOTE_POLL_S * 0.9 <= longest < REMOTE_POLL_S + 0.05


def test_exchange_returns_what_came_by_the_timeout() -> None:
    """A node that never replies does not hold the round past round-timeout."""
    grid = _SlowGrid([1, 10**9])
    started = time.monotonic()
    replies = exchange(grid, [], timeout=0.3)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.3 <= time.monotonic() - started < 1.0
