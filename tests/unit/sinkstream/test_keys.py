"""Key schema: one hash tag (one cluster slot) per stream; ids that could escape it are refused."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from sinkstream.contracts.keys import RUNNABLE, STREAMS_REGISTRY, StreamKeys
from sinkstream.ids import MAX_STREAM_ID_LENGTH, InvalidStreamId, validate_stream_id


def _all_keys(keys: StreamKeys) -> list[str]:
    return [keys.input, keys.output, keys.dead, keys.state, keys.state_chunk(3, 7), keys.lease,
            keys.fence, keys.producers, keys.meta, keys.summary, keys.scheduled, keys.memory,
            keys.vocab, keys.state_pending, keys.state_segment(2, "ab")]


def test_every_key_of_a_stream_carries_its_hash_tag_and_shares_a_slot() -> None:
    keys = StreamKeys.of("standup")
    names = _all_keys(keys)
    assert keys.input == "sinkstream:{standup}:in"
    assert len(set(names)) == len(names)
    assert all(name.startswith("sinkstream:{standup}:") for name in names)
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"standup")}


def test_different_streams_have_different_tags() -> None:
    a, b = StreamKeys.of("a"), StreamKeys.of("b")
    assert a.input != b.input and a.producers != b.producers
    assert key_slot(a.input.encode()) == key_slot(b"a")


def test_global_keys_are_not_inside_any_stream_tag() -> None:
    for key in (STREAMS_REGISTRY, RUNNABLE):
        assert "{" not in key and key.startswith("sinkstream:")


@pytest.mark.parametrize(
    "stream_id", ["standup", "a", "0", "A.b_c-1", "meeting-2024.05.01_room3", "x" * 128]
)
def test_valid_ids(stream_id: str) -> None:
    assert validate_stream_id(stream_id) == stream_id
    assert StreamKeys.of(stream_id).stream_id == stream_id


@pytest.mark.parametrize(
    "stream_id",
    [
        "a}:x",  # closes the tag early: would land in another stream's keyspace
        "{a}",
        "a{b",
        "a b",
        "",
        "x" * 200,
        "x" * (MAX_STREAM_ID_LENGTH + 1),
        "a:b",
        "a*",
        "a?",
        "-a",
        ".hidden",
        "_a",
        "a\n",
        "a\x00b",
        "café",
        "a/b",
    ],
)
def test_invalid_ids_are_refused(stream_id: str) -> None:
    with pytest.raises(InvalidStreamId):
        StreamKeys.of(stream_id)


@pytest.mark.parametrize("value", [None, 123, b"bytes"])
def test_non_string_ids_are_refused(value: object) -> None:
    with pytest.raises(InvalidStreamId, match="must be a string"):
        validate_stream_id(value)  # type: ignore[arg-type]


def test_error_messages_say_what_is_allowed() -> None:
    with pytest.raises(InvalidStreamId, match=r"letters, digits, '\.', '_' and '-'"):
        StreamKeys.of("a}:x")
    with pytest.raises(InvalidStreamId, match="1..128 characters, got 200"):
        StreamKeys.of("x" * 200)
    with pytest.raises(InvalidStreamId, match="got 0"):
        StreamKeys.of("")


def test_invalid_id_is_a_value_error_for_generic_handlers() -> None:
    assert issubclass(InvalidStreamId, ValueError)
