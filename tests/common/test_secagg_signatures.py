"""What secure-aggregation nodes sign: unambiguous, bound to every field, any node id."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from common.secure_aggregation.consistency import (
    ConsistencyInstruction,
    UnmaskInstruction,
    advert_message,
    participants_digest,
    uploaders_message,
)
from common.secure_aggregation.protocol import ProtocolError, PublicKeys

BIG = 2**64 - 1  # Flower's node ids are unsigned 64-bit


def test_messages_take_any_flower_node_id_and_bind_every_field() -> None:
    keys = PublicKeys(bytes(32), bytes(range(32)))
    base = advert_message(7, 3, BIG, keys, b"plan")
    assert advert_message(7, 3, BIG, keys, b"plan") == base
    for other in (
        advert_message(8, 3, BIG, keys, b"plan"),
        advert_message(7, 4, BIG, keys, b"plan"),
        advert_message(7, 3, BIG - 1, keys, b"plan"),
        advert_message(7, 3, BIG, PublicKeys(bytes(range(32)), bytes(32)), b"plan"),
        advert_message(7, 3, BIG, keys, b"plan2"),
    ):
        assert other != base
    ids = {BIG: b"a" * 32, 5: b"b" * 32, 9: b"c" * 32}
    everyone = participants_digest(ids)
    signed = uploaders_message(7, 3, b"d" * 32, everyone, (BIG, 5), ids)
    assert signed == uploaders_message(7, 3, b"d" * 32, everyone, (5, BIG), ids)
    assert signed != uploaders_message(7, 3, b"d" * 32, everyone, (BIG, 9), ids)
    fewer = participants_digest({BIG: ids[BIG], 5: ids[5]})
    assert signed != uploaders_message(7, 3, b"d" * 32, fewer, (BIG, 5), ids)
    assert signed != uploaders_message(7, 3, b"e" * 32, everyone, (BIG, 5), ids)


def test_instructions_round_trip_and_refuse_what_does_not_parse() -> None:
    unmask = UnmaskInstruction(2, (5, 9, BIG), {5: b"s" * 64, BIG: b"t" * 64})
    assert UnmaskInstruction.from_record(unmask.to_record()) == unmask
    consistency = ConsistencyInstruction(2, (9, BIG))
    parsed = ConsistencyInstruction.from_record(consistency.to_record())
    assert sorted(parsed.uploaded) == sorted(consistency.uploaded)
    with pytest.raises(ProtocolError, match="outside the uploader set"):
        UnmaskInstruction(2, (5,), {9: b"s" * 64})
    record = dict(unmask.to_record())
    record["signatures"] = record["signatures"][:1]
    with pytest.raises(ProtocolError, match="one per distinct signer"):
        UnmaskInstruction.from_record(ConfigRecord(record))
