"""Compressed updates (``update-compression``): the codec, and the server's side of it.

The codec's round trip stays within its stated bound and its stochastic rounding is
unbiased and drawn from OS entropy. Real ClientApps (in process) send compressed
replies that the server decodes, validates and aggregates to what the float32 replies
give, within the codec's bound, with the same ledgers (compression is post-
processing). A malformed compressed reply is rejected with a reason, and every
privacy mode records the bytes each node's messages cost in ``rounds.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import server.app as server_app
from common.config import RunConfig
from common.privacy.randomness import integer_generator
from common.run_keys import UPDATE_COMPRESSIONS
from common.tasks.models import build_model
from common.wire.reply_fields import COMPRESSED_CHANGE_KEY, COMPRESSED_UPDATE_KEY, Status
from common.wire.update_codec import (
    ENCODED_ARRAY,
    FLOAT16_ABSOLUTE,
    FLOAT16_RELATIVE,
    CodecError,
    UpdateCodec,
    apply_change,
)
from server.app import make_strategy
from server.messaging import content_bytes
from simulations.launch.in_process_federation import InProcessGrid, federation
from tests.helpers.secure_aggregation import use_dealer

CODECS = [name for name in UPDATE_COMPRESSIONS if name != "none"]
SHAPES = [(64, 64), (64,), (10, 64), (10,)]  # the digits MLP
BAD = 102  # the node whose reply is rewritten (partition 2 of 3)


@pytest.fixture(autouse=True)
def _server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)  # as the ServerApp process has


def _change(seed: int = 0, scale: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * scale for shape in SHAPES]


def _reference() -> list[np.ndarray]:
    return [np.zeros(shape, np.float32) for shape in SHAPES]


def _steps(vector: np.ndarray, count: int) -> np.ndarray:
    """The per-array steps in an ``int*`` wire vector's (lo, step) header."""
    return vector[: 8 * count].view("<f4").reshape(count, 2)[:, 1].astype(np.float64)


# -- the codec --------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODECS)
def test_round_trip_stays_within_the_codecs_bound(name: str) -> None:
    """Every decoded value is within one step (b-bit codes) or float16's rounding of
    the value sent, the stated L2 bound holds, and the vector has the stated length."""
    codec = UpdateCodec(name)
    change = _change()
    record = codec.encode(change, integer_generator())
    vector = record[ENCODED_ARRAY].numpy()
    assert vector.shape == (codec.encoded_length(SHAPES),)
    decoded = codec.decode(record, _reference())
    errors = [d - c for d, c in zip(decoded.arrays, change, strict=True)]
    if codec.quantised:
        for error, step in zip(errors, _steps(vector, len(SHAPES)), strict=True):
            assert step > 0 and np.abs(error).max() <= step * (1 + 1e-9)
    else:
        for error, value in zip(errors, change, strict=True):
            assert (
                np.abs(error) <= FLOAT16_RELATIVE * np.abs(value) + FLOAT16_ABSOLUTE
            ).all()
    total = math.sqrt(sum(float(np.sum(e**2)) for e in errors))
    assert 0 < total <= decoded.error_norm
    assert [a.shape for a in decoded.arrays] == SHAPES


def test_stochastic_rounding_is_unbiased() -> None:
    """The coarsest codes (2 bits, 4 levels): the mean of 400 decodings of the same
    change is the change, to within 6 standard errors everywhere."""
    codec = UpdateCodec("int2")
    change = _change(seed=1)
    decodings = [
        codec.decode(codec.encode(change, integer_generator()), _reference()).arrays
        for _ in range(400)
    ]
    vector = codec.encode(change, integer_generator())[ENCODED_ARRAY].numpy()
    for index, (value, step) in enumerate(
        zip(change, _steps(vector, len(SHAPES)), strict=True)
    ):
        mean = np.mean([d[index] for d in decodings], axis=0)
        standard_error = step / 2 / math.sqrt(400)  # a rounding's sd is at most step/2
        assert np.abs(mean - value).max() < 6 * standard_error


def test_the_rounding_is_not_seeded() -> None:
    """The same change, with torch's and NumPy's global generators reset to the same
    seed before each encoding, gives different codes: the rounding draws OS entropy."""
    codec = UpdateCodec("int4")
    vectors = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        vectors.append(codec.encode(_change(), integer_generator())[ENCODED_ARRAY].numpy())
    assert not np.array_equal(*vectors)


@pytest.mark.parametrize(
    ("dataset", "features"),
    [("digits", "pixels"), ("fashion-mnist", "pixels"), ("fashion-mnist", "scattering")],
)
def test_int4_and_int2_send_under_a_quarter_of_float32(dataset: str, features: str) -> None:
    """Flower's serialised bytes of the encoded change against the float32 weights."""
    state = build_model(dataset, seed=0, features=features).state_dict()
    plain = content_bytes(RecordDict({"arrays": ArrayRecord(state)}))
    change = [t.numpy() * 0.01 for t in state.values()]
    sizes = {
        name: content_bytes(
            RecordDict({"c": UpdateCodec(name).encode(change, integer_generator())})
        )
        for name in ("float16", "int8", "int4", "int2")
    }
    assert sizes["int4"] < plain / 4 and sizes["int2"] < sizes["int4"]
    assert sizes["float16"] < plain / 1.9 and sizes["int8"] < plain / 3.5


def _record(vector: np.ndarray, **extra: np.ndarray) -> ArrayRecord:
    return ArrayRecord(
        {ENCODED_ARRAY: Array(vector), **{k: Array(v) for k, v in extra.items()}}
    )


def _honest_vector(name: str = "int4") -> np.ndarray:
    return UpdateCodec(name).encode(_change(), integer_generator())[ENCODED_ARRAY].numpy()


def _with_header(lo: float, step: float) -> np.ndarray:
    vector = _honest_vector().copy()
    header = vector[:8].view("<f4")
    header[:] = (lo, step)
    return vector


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (lambda: _record(_honest_vector()[:-1]), "is uint8["),
        (lambda: _record(_honest_vector().view(np.int8)), "got int8"),
        (lambda: _record(_honest_vector(), x=np.zeros(2)), "one array 'encoded'"),
        (lambda: _record(_with_header(float("nan"), 0.1)), "header is not finite"),
        (lambda: _record(_with_header(0.0, -0.1)), "header is not finite and ≥ 0"),
        (lambda: _record(_honest_vector("float16")), "is uint8["),
        (
            lambda: ArrayRecord({ENCODED_ARRAY: Array(np.zeros((2, 3), np.uint8))}),
            "got uint8[2, 3]",
        ),
    ],
)
def test_a_malformed_encoding_does_not_decode(
    record: Callable[[], ArrayRecord], reason: str
) -> None:
    """Every departure from the layout raises CodecError saying what was expected."""
    with pytest.raises(CodecError) as info:
        UpdateCodec("int4").decode(record(), _reference())
    assert reason in str(info.value)


def test_float16_refuses_what_it_cannot_hold() -> None:
    """A change past float16's range is not silently sent as infinity; a received
    non-finite float16 change does not decode."""
    codec = UpdateCodec("float16")
    with pytest.raises(CodecError, match="exceeds float16's range"):
        codec.encode([np.full(3, 1e6)], integer_generator())
    vector = np.full(3, np.inf, np.float16)
    with pytest.raises(CodecError, match="NaN or infinite"):
        codec.decode(_record(vector), [np.zeros(3, np.float32)])


# -- the server, with real clients ------------------------------------------------------
def _cfg(**changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(
        num_rounds=2, target_epsilon=8.0, reproducible_noise=True,
        min_train_nodes=2, min_available_nodes=2,
    )  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


Tamper = Callable[[Message, int], Message]


def _play(
    cfg: RunConfig, rounds: int, tamper: Tamper | None = None
) -> list[tuple[ArrayRecord | None, list, list[Message]]]:
    """``rounds`` rounds of the strategy over 3 in-process nodes: per round the
    aggregate, the outcomes, and the replies as the server got them."""
    grid = InProcessGrid(federation(cfg, [0, 1, 2], 3), {BAD: tamper} if tamper else {})
    strategy = make_strategy(cfg)
    arrays: ArrayRecord | None = ArrayRecord(
        build_model("digits", seed=cfg.seed).state_dict()
    )
    played = []
    for server_round in range(1, rounds + 1):
        assert arrays is not None
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = list(grid.pull_messages(grid.push_messages(messages)))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        played.append((arrays, strategy.last_outcomes, replies))
    return played


def test_compressed_replies_aggregate_to_the_float32_ones_with_the_same_ledgers() -> None:
    """The noise is replayable here (reproducible-noise), so both runs train the same
    weights in round 1: the int4 aggregate is the float32 one to within the largest
    step any client's encoding used, each compressed reply is a fifth of the float32
    one or less, and every node's ledger (hence ε) is the same in both runs."""
    plain = _play(_cfg(update_compression="none"), 2)
    packed = _play(_cfg(update_compression="int4"), 2)
    (want, _, plain_replies), (got, outcomes, replies) = plain[0], packed[0]
    assert want is not None and got is not None
    assert [o.status for o in outcomes] == [Status.TRAINED] * 3
    assert all(o.compressed for o in outcomes)
    vectors = [r.content[COMPRESSED_CHANGE_KEY][ENCODED_ARRAY].numpy() for r in replies]
    steps = np.max([_steps(v, len(SHAPES)) for v in vectors], axis=0)
    moved = False
    for key, step in zip(want.keys(), steps, strict=True):
        difference = np.abs(got[key].numpy() - want[key].numpy())
        assert difference.max() <= step * (1 + 1e-6) + 1e-6
        moved |= bool(difference.max() > 0)
    assert moved  # the encoding did round
    for compressed, full in zip(replies, plain_replies, strict=True):
        assert content_bytes(compressed.content) < content_bytes(full.content) / 5
    for round_plain, round_packed in zip(plain, packed, strict=True):
        ledgers = [
            {o.node_id: (o.ledger.history(), o.ledger.rounds, o.epsilon) for o in r[1]}
            for r in (round_plain, round_packed)
        ]
        assert ledgers[0] == ledgers[1]
        assert all(math.isfinite(eps) for _, _, eps in ledgers[1].values())


def test_a_robust_rule_reads_the_decoded_weights() -> None:
    """aggregation = "median" over int4 replies: the coordinate-wise median of the
    weights the server decodes (global model + each decoded change)."""
    cfg = _cfg(update_compression="int4", aggregation="median", num_rounds=1)
    ((arrays, outcomes, replies),) = _play(cfg, 1)
    assert arrays is not None and [o.status for o in outcomes] == [Status.TRAINED] * 3
    initial = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
    reference = initial.to_numpy_ndarrays()
    decoded = [
        apply_change(
            reference,
            UpdateCodec("int4").decode(r.content[COMPRESSED_CHANGE_KEY], reference).arrays,
        )
        for r in replies
    ]
    for index, key in enumerate(initial.keys()):
        median = np.median(np.stack([d[index] for d in decoded]), axis=0)
        np.testing.assert_allclose(arrays[key].numpy(), median, rtol=1e-6, atol=1e-7)


def _rewrite(
    change: Callable[[ArrayRecord], dict[str, ArrayRecord]],
) -> Tamper:
    """A tamper replacing the reply's array records (the report stays)."""

    def tamper(reply: Message, _round: int) -> Message:
        content = RecordDict(
            {
                "report": reply.content["report"],
                **change(reply.content[COMPRESSED_CHANGE_KEY]),
            }
        )
        return Message(content=content, metadata=reply.metadata)

    return tamper


def _vector(record: ArrayRecord) -> np.ndarray:
    return record[ENCODED_ARRAY].numpy().copy()


def _header(lo: float, step: float) -> Tamper:
    def change(record: ArrayRecord) -> dict[str, ArrayRecord]:
        vector = _vector(record)
        vector[:8].view("<f4")[:] = (lo, step)
        return {COMPRESSED_CHANGE_KEY: _record(vector)}

    return _rewrite(change)


def _float32_weights(record: ArrayRecord) -> dict[str, ArrayRecord]:
    state = build_model("digits", seed=0).state_dict()
    return {"arrays": ArrayRecord(state)}


MALFORMED: dict[str, tuple[Tamper, str]] = {
    "truncated": (
        _rewrite(lambda r: {COMPRESSED_CHANGE_KEY: _record(_vector(r)[:-3])}),
        "update rejected: the int4 change: an int4 change for this model is uint8[",
    ),
    "float16 for int4": (
        _rewrite(lambda r: {COMPRESSED_CHANGE_KEY: _record(np.zeros(4810, np.float16))}),
        "got float16[4810]",
    ),
    "NaN scale": (_header(float("nan"), 0.1), "header is not finite"),
    "negative step": (_header(0.0, -1.0), "header is not finite and ≥ 0"),
    "past float32": (_header(3e38, 3e38), "decodes past the model's dtype"),
    "x100 step": (_header(-100.0, 100.0), "(run config key 'max-update-norm')"),
    "two array records": (
        _rewrite(lambda r: {COMPRESSED_CHANGE_KEY: r, **_float32_weights(r)}),
        "reply breaks the contract: a 'trained' reply carries arrays ['arrays', "
        "'compressed-change'], expected ['compressed-change']",
    ),
    "float32 weights in an int4 run": (
        _rewrite(_float32_weights),
        "update-compression 'int4' needs a compressed update, got float32 arrays",
    ),
}


@pytest.mark.parametrize("attack", list(MALFORMED))
def test_a_malformed_compressed_reply_is_rejected_with_its_reason(attack: str) -> None:
    """The round goes on: the bad reply is ``rejected`` naming what failed and the
    aggregate is finite, made of the two honest nodes."""
    tamper, reason = MALFORMED[attack]
    ((arrays, outcomes, _),) = _play(_cfg(update_compression="int4"), 1, tamper)
    by_node = {o.node_id: o for o in outcomes}
    assert by_node[BAD].status is Status.REJECTED
    assert reason in str(by_node[BAD].reason)
    assert [by_node[n].status for n in (100, 101)] == [Status.TRAINED] * 2
    assert arrays is not None
    assert all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())


def test_a_compressed_reply_in_a_float32_run_is_rejected() -> None:
    """The other direction: the run sends float32 (``none``), a node compresses."""

    def compress(reply: Message, _round: int) -> Message:
        record = reply.content["arrays"]
        initial = build_model("digits", seed=0).state_dict()
        change = [
            a - t.numpy()
            for a, t in zip(record.to_numpy_ndarrays(), initial.values(), strict=True)
        ]
        encoded = UpdateCodec("int4").encode(change, integer_generator())
        content = RecordDict(
            {"report": reply.content["report"], COMPRESSED_CHANGE_KEY: encoded}
        )
        return Message(content=content, metadata=reply.metadata)

    ((_, outcomes, _),) = _play(_cfg(update_compression="none"), 1, compress)
    (bad,) = [o for o in outcomes if o.node_id == BAD]
    assert bad.status is Status.REJECTED
    assert "update-compression 'none' needs float32 arrays, got a compressed" in str(
        bad.reason
    )


def _client_level_cfg(**changes: Any) -> RunConfig:
    values: dict[str, Any] = dict(
        privacy_mode="client", target_epsilon=0.0, noise_multiplier=1.0,
        client_sampling_rate=1.0, client_clip_norm=0.05, num_rounds=2,
        min_available_nodes=3, min_train_nodes=1, reproducible_noise=True,
        update_compression="int4",
    )  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


def test_client_level_compressed_updates_pass_and_an_inflated_one_is_rejected(
    tmp_path: Path,
) -> None:
    """Client-level DP with int4: honest clipped changes, encoded, pass validation
    (their decoded norm is within C plus the encoding's bound) and move the model; a
    node that shifts every array's ``lo`` by 1 is rejected on the norm, not
    re-clipped."""

    def inflate(reply: Message, _round: int) -> Message:
        vector = reply.content[COMPRESSED_UPDATE_KEY][ENCODED_ARRAY].numpy().copy()
        header = vector[: 8 * len(SHAPES)].view("<f4")
        header[0::2] += np.float32(1)  # every lo: the change moves by 1 everywhere
        content = RecordDict(
            {"report": reply.content["report"], COMPRESSED_UPDATE_KEY: _record(vector)}
        )
        return Message(content=content, metadata=reply.metadata)

    for tamper, want in ((None, [Status.TRAINED] * 3), (inflate, None)):
        out = tmp_path / ("honest" if tamper is None else "inflated")
        out.mkdir()
        cfg = _client_level_cfg(results_dir=str(out))  # the nodes' ledgers live there
        contexts = federation(cfg, [0, 1, 2], 3)
        grid = InProcessGrid(contexts, {BAD: tamper} if tamper else {})
        strategy = make_strategy(cfg, out, 1)
        strategy.start_run(grid.get_node_ids())
        arrays = ArrayRecord(build_model("digits", seed=cfg.seed).state_dict())
        for server_round in (1, 2):
            step = strategy.train_round(server_round, arrays, grid, 5.0)
            assert step.arrays is not None
            outcomes = {o.node_id: o for o in strategy.last_outcomes}
            if want is not None:
                assert [o.status for o in outcomes.values()] == want
                assert all(o.compressed for o in outcomes.values())
            else:
                assert outcomes[BAD].status is Status.REJECTED
                assert "the encoding's error bound" in str(outcomes[BAD].reason)
            before = arrays.to_numpy_ndarrays()
            arrays = step.arrays
            moved = [
                not np.array_equal(a, b)
                for a, b in zip(before, arrays.to_numpy_ndarrays(), strict=True)
            ]
            assert all(moved)


# -- bytes per round, every privacy mode ------------------------------------------------
def _server_context(cfg: RunConfig) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(),
        run_config=cfg.to_run_config(),
    )  # fmt: skip


MODES: dict[str, dict[str, Any]] = {
    "sample": {},
    "none": {"privacy_mode": "none", "target_epsilon": 0.0},
    "client": {
        "privacy_mode": "client",
        "target_epsilon": 0.0,
        "noise_multiplier": 1.0,
        "client_sampling_rate": 1.0,
        "min_train_nodes": 1,
    },  # fmt: skip
    "secure aggregation": {
        "privacy_mode": "client",
        "secure_aggregation": True,
        "target_epsilon": 0.0,
        "noise_multiplier": 1.0,
        "delta": 1e-3,
        "client_sampling_rate": 1.0,
        "secagg_min_contributors": 0.6,
        "secagg_timeout": 5.0,
    },  # fmt: skip
}


@pytest.mark.parametrize("mode", list(MODES))
def test_rounds_record_the_bytes_every_node_sent_and_received(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp's main over in-process nodes, one round: ``message_bytes`` counts
    every node's messages both ways (int4 updates; secure aggregation's own masked
    vectors, whose count agrees with the protocol's), and summary.json sums them."""
    nodes = 5 if mode == "secure aggregation" else 2
    if mode == "secure aggregation":
        use_dealer(tmp_path, monkeypatch, nodes)  # the launcher's certified identities
    cfg = RunConfig(
        **{
            "num_rounds": 1,
            "min_available_nodes": nodes,
            "min_train_nodes": 2,
            "results_dir": str(tmp_path / "run"),
            **MODES[mode],
        }  # fmt: skip
    )
    grid = InProcessGrid(federation(cfg, range(nodes), nodes))
    server_app.main(grid, _server_context(cfg))  # type: ignore[arg-type]
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").open()]
    block = record["message_bytes"]
    train = block["train"]
    assert train["up_clients"] == train["down_clients"] == nodes
    assert train["up_total"] == pytest.approx(
        train["up_per_client_median"] * nodes, rel=0.1
    )
    float32 = 4 * 4810  # the digits MLP's weights alone
    assert train["down_per_client_median"] > float32
    if mode == "secure aggregation":
        assert block["update_encoding"] == "masked"
        facts = record["client_level"]["secure_aggregation"]
        assert train["up_per_client_median"] == facts["bytes_up_per_client_median"]
        assert train["down_per_client_median"] == facts["bytes_down_per_client_median"]
    else:
        assert block["update_encoding"] == "int4"
        assert train["up_per_client_max"] < float32 / 4
    assert block["evaluate"] is None  # fraction-evaluate = 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["message_bytes"]
    assert summary["up_total"] == train["up_total"]
    assert summary["down_per_client_per_round_median"] == train["down_per_client_median"]
