"""State codec: exact round trips, and every kind of damage is one specific, fast error."""

from __future__ import annotations

import struct
import time
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinkstream.contracts.formats import NewerFormatError
from state_store import codec
from state_store.codec import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    NEWEST_VERSION,
    XXH3_VERSION,
    ForeignStateError,
    StateCorruptError,
    StateEnvelope,
    StateError,
    StateFormatError,
    StateTooLargeError,
    StateTooNewError,
    check_compatible,
    decode_segment,
    decode_segments,
    decode_state,
    encode_state,
    seal,
)
from state_store.tensors import RawTensor, StateSnapshot

PARAMS = {"sink_tokens": 4, "recent_tokens": 1020, "chunk_tokens": 64, "dtype": "bfloat16"}


def make_envelope(seed: int = 0) -> StateEnvelope:
    # bf16 bytes that are not valid float32 patterns, a NaN-like pattern, an empty tensor.
    bf16 = bytes((seed + i * 7) % 256 for i in range(2 * 3 * 5 * 2))
    tensors = {
        "layer0.keys": RawTensor("bfloat16", (2, 3, 5), bf16),
        "layer0.slots": RawTensor("int64", (5,), struct.pack("<5q", 0, 1, 2, 3, -1)),
        "nan": RawTensor("float32", (1,), b"\x01\x00\xc0\x7f"),
        "empty": RawTensor("float16", (1, 0, 4), b""),
    }
    scalars = {"pending": [1, 2, 3], "tokens_seen": 1234, "note": "x", "f": 0.5, "n": None}
    return StateEnvelope(
        engine="sinkkv",
        fingerprint="ab" * 32,
        params=dict(PARAMS),
        tokens_seen=1234,
        last_entry_id="1700000000000-3",
        snapshot=StateSnapshot(tensors=tensors, scalars=scalars),
    )


@pytest.fixture(scope="module")
def encoded() -> bytes:
    return encode_state(make_envelope())


# ----- round trip ------------------------------------------------------------------------------
def test_round_trip_is_bit_identical(encoded: bytes) -> None:
    original = make_envelope()
    decoded = decode_state(encoded)
    assert decoded == original
    for name, tensor in original.snapshot.tensors.items():
        back = decoded.snapshot.tensors[name]
        assert back.data == tensor.data and back.dtype == tensor.dtype
        assert back.shape == tensor.shape
    assert decoded.snapshot.tensors["layer0.keys"].dtype == "bfloat16"
    assert list(decoded.snapshot.tensors) == list(original.snapshot.tensors)  # order kept


def test_encoding_is_deterministic(encoded: bytes) -> None:
    assert encode_state(make_envelope()) == encoded
    assert encoded.startswith(MAGIC)


def test_no_last_entry_id_and_memoryview_input() -> None:
    env = StateEnvelope("rwkv", "f", {}, 0, None, StateSnapshot({}, {}))
    data = encode_state(env)
    assert decode_state(memoryview(data)) == env
    assert decode_state(bytearray(data)) == env


def test_encode_refuses_unserialisable_params_and_oversize() -> None:
    env = make_envelope()
    bad = StateEnvelope("sinkkv", "f", {"x": object()}, 0, None, env.snapshot)
    with pytest.raises(TypeError, match="msgpack"):
        encode_state(bad)
    with pytest.raises(StateTooLargeError):
        encode_state(env, max_bytes=100)
    with pytest.raises(ValueError, match="entry id"):
        encode_state(StateEnvelope("sinkkv", "f", {}, 0, "nope", env.snapshot))


# ----- damage ----------------------------------------------------------------------------------
def test_truncated_states_are_corrupt(encoded: bytes) -> None:
    for size in (0, 3, len(MAGIC), HEADER_SIZE - 1, HEADER_SIZE, len(encoded) // 2,
                 len(encoded) - 1):
        with pytest.raises(StateCorruptError, match="truncated"):
            decode_state(encoded[:size], stream_id="standup")


def test_blake2b_stays_the_default_and_xxh3_reads_back_the_same(encoded: bytes) -> None:
    """Builds before xxh3 read only version 1: it stays what a state is written in unless a
    deployment asks for xxh3; either reads back to the same envelope."""
    assert struct.unpack_from(">H", encoded, len(MAGIC))[0] == FORMAT_VERSION
    fast = encode_state(make_envelope(), checksum="xxh3")
    assert struct.unpack_from(">H", fast, len(MAGIC))[0] == XXH3_VERSION
    assert fast[HEADER_SIZE:] == encoded[HEADER_SIZE:]  # the same payload, another digest
    assert fast[len(MAGIC) + 12 : HEADER_SIZE] != encoded[len(MAGIC) + 12 : HEADER_SIZE]
    assert decode_state(fast) == decode_state(encoded) == make_envelope()
    with pytest.raises(ValueError, match="unknown state checksum 'md5'"):
        encode_state(make_envelope(), checksum="md5")


def test_a_flipped_bit_fails_the_xxh3_digest_too() -> None:
    fast = bytearray(encode_state(make_envelope(), checksum="xxh3"))
    fast[len(fast) - 10] ^= 0x10
    with pytest.raises(StateCorruptError, match="checksum mismatch"):
        decode_state(bytes(fast), stream_id="standup")
    version_swapped = bytearray(encode_state(make_envelope(), checksum="xxh3"))
    struct.pack_into(">H", version_swapped, len(MAGIC), FORMAT_VERSION)  # read as blake2b
    with pytest.raises(StateCorruptError, match="checksum mismatch"):
        decode_state(bytes(version_swapped))


def test_trailing_bytes_are_corrupt(encoded: bytes) -> None:
    with pytest.raises(StateCorruptError, match="trailing"):
        decode_state(encoded + b"\x00")


def test_flipped_payload_bit_is_a_checksum_mismatch(encoded: bytes) -> None:
    damaged = bytearray(encoded)
    damaged[len(encoded) - 10] ^= 0x10
    with pytest.raises(StateCorruptError, match="checksum mismatch") as info:
        decode_state(bytes(damaged), stream_id="standup")
    assert str(info.value).startswith("stream 'standup': state checksum mismatch")
    assert info.value.stream_id == "standup"


def test_foreign_bytes_are_a_format_error() -> None:
    for foreign in (b"\x80\x04\x95" + b"\x00" * 64, b"PK\x03\x04" * 20, b"{}", b"hello world"):
        with pytest.raises(StateFormatError, match="not a sinkstream state"):
            decode_state(foreign, stream_id="s1")


def test_a_newer_format_version_is_told_apart_from_a_wrong_one(encoded: bytes) -> None:
    """A version past ours is an upgraded worker's state (left for one, not parked); 0 or
    unknown flags are damage or a foreign writer. Both stay format errors to a reader that
    only reports them."""
    payload = encoded[HEADER_SIZE:]
    with pytest.raises(StateTooNewError) as info:
        decode_state(seal(payload, format_version=NEWEST_VERSION + 1), stream_id="standup")
    assert isinstance(info.value, StateFormatError) and isinstance(info.value, NewerFormatError)
    assert (info.value.version, info.value.newest) == (NEWEST_VERSION + 1, NEWEST_VERSION)
    assert str(info.value) == (
        f"stream 'standup': state is format version {NEWEST_VERSION + 1}, newer than this "
        f"build reads (up to {NEWEST_VERSION}): a newer sinkstream wrote it; upgrade to read it")
    with pytest.raises(StateTooNewError):  # a segment says so for the whole state
        decode_segment(seal(payload, format_version=NEWEST_VERSION + 7), segment=3)
    for wrong in (seal(payload, format_version=0), seal(payload, flags=1)):
        with pytest.raises(StateFormatError, match="not supported|flags") as info:
            decode_state(wrong)
        assert not isinstance(info.value, NewerFormatError)


def test_huge_declared_payload_is_refused_before_reading(encoded: bytes) -> None:
    header = bytearray(encoded[:HEADER_SIZE])
    struct.pack_into(">Q", header, 12, 2**63)
    with pytest.raises(StateTooLargeError, match="declares"):
        decode_state(bytes(header) + b"\x00" * 10)
    with pytest.raises(StateTooLargeError):
        decode_state(encoded, max_bytes=len(encoded) - 1)


def _hostile_payloads() -> dict[str, bytes]:
    good = msgpack.unpackb(encode_state(make_envelope())[HEADER_SIZE:], raw=False)

    def with_tensor(entry: object) -> bytes:
        return msgpack.packb({**good, "tensors": [entry]}, use_bin_type=True)

    return {
        # containers and blobs that declare ~4 GiB but hold a few bytes
        "array32": b"\xdd\xff\xff\xff\xff" + b"\xc0" * 8,
        "map32": b"\xdf\xff\xff\xff\xff" + b"\xc0" * 8,
        "bin32": b"\xc6\xff\xff\xff\xff" + b"\x00" * 8,
        "str32": b"\xdb\xff\xff\xff\xff" + b"a" * 8,
        "ext": b"\xd6\xff\x00\x00\x00\x00",  # a msgpack timestamp: ext types are refused
        "deep": b"\x91" * 100_000 + b"\xc0",
        "not a map": msgpack.packb([1, 2, 3]),
        "missing fields": msgpack.packb({"engine": "sinkkv"}),
        "bad utf8": b"\x81\xa3\xff\xfe\xfd\xc0",
        "int keys": b"\x81\x01\x02",
        "huge shape": with_tensor(["t", "float32", [2**40, 2**40, 2**40], b""]),
        "negative dim": with_tensor(["t", "float32", [-1], b""]),
        "too many dims": with_tensor(["t", "uint8", [1] * 40, b"\x00"]),
        "shape/bytes mismatch": with_tensor(["t", "float32", [3], b"\x00" * 8]),
        "unknown dtype": with_tensor(["t", "complex64", [1], b"\x00" * 8]),
        "data not bin": with_tensor(["t", "uint8", [1], "x"]),
        "tensor not a list": with_tensor({"name": "t"}),
        "bool dim": with_tensor(["t", "uint8", [True], b"\x00"]),
        "duplicate": msgpack.packb(
            {**good, "tensors": [["t", "uint8", [1], b"\x00"], ["t", "uint8", [1], b"\x00"]]},
            use_bin_type=True,
        ),
        "negative tokens": msgpack.packb({**good, "tokens_seen": -1}, use_bin_type=True),
        "bool tokens": msgpack.packb({**good, "tokens_seen": True}, use_bin_type=True),
        "bad entry id": msgpack.packb({**good, "last_entry_id": "x-1"}, use_bin_type=True),
        "params not a map": msgpack.packb({**good, "params": [1]}, use_bin_type=True),
        "trailing data": msgpack.packb(good, use_bin_type=True) + b"\xc0",
    }


@pytest.mark.parametrize("name", sorted(_hostile_payloads()))
def test_well_sealed_hostile_payloads_are_corrupt_fast_and_small(name: str) -> None:
    sealed = seal(_hostile_payloads()[name])
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(StateCorruptError, match="stream 's': "):
            decode_state(sealed, stream_id="s")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 20 * 1024 * 1024, f"{name}: peak {peak} bytes"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_state_errors(data: bytes) -> None:
    with pytest.raises(StateError):
        decode_state(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_sealed_payloads_only_raise_state_errors(payload: bytes) -> None:
    try:
        decode_state(seal(payload))
    except StateError:
        pass


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(
    ["engine", "fingerprint", "params", "tokens_seen", "last_entry_id", "scalars", "tensors",
     "other"]), _msgpack_values))
def test_sealed_random_structures_only_raise_state_errors(obj: dict[str, object]) -> None:
    try:
        env = decode_state(seal(msgpack.packb(obj, use_bin_type=True)))
    except StateError:
        return
    assert isinstance(env, StateEnvelope)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_states_fail_with_state_errors(data: st.DataObject) -> None:
    original = encode_state(make_envelope())
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if not mutated and kind != "insert":
            kind = "insert"
        pos = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if kind == "flip":
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del mutated[pos:]
        elif kind == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del mutated[pos : pos + data.draw(st.integers(1, 8))]
    if bytes(mutated) == original:
        return
    with pytest.raises(StateError):
        decode_state(bytes(mutated), stream_id="fuzz")


# ----- compatibility ---------------------------------------------------------------------------
def test_check_compatible_accepts_the_same_engine() -> None:
    env = decode_state(encode_state(make_envelope()))
    check_compatible(env, "sinkkv", "ab" * 32, dict(PARAMS))


def test_check_compatible_normalises_tuples() -> None:
    params = {"window": (4, 1020)}
    env = decode_state(encode_state(
        StateEnvelope("sinkkv", "f", params, 0, None, StateSnapshot({}, {}))))
    check_compatible(env, "sinkkv", "f", params)


@pytest.mark.parametrize(
    ("engine", "fingerprint", "params", "named"),
    [
        ("rwkv", "ab" * 32, PARAMS, "engine: stored 'sinkkv', this worker 'rwkv'"),
        ("sinkkv", "cd" * 32, PARAMS, "fingerprint"),
        ("sinkkv", "ab" * 32, {**PARAMS, "sink_tokens": 8}, "params.sink_tokens: stored 4"),
        ("sinkkv", "ab" * 32, {**PARAMS, "extra": 1}, "params.extra: stored '<missing>'"),
    ],
)
def test_check_compatible_names_the_difference(
    engine: str, fingerprint: str, params: dict[str, object], named: str
) -> None:
    env = decode_state(encode_state(make_envelope()))
    with pytest.raises(ForeignStateError) as info:
        check_compatible(env, engine, fingerprint, params, stream_id="standup")
    assert named in str(info.value)
    assert str(info.value).startswith("stream 'standup': ")
    assert len(info.value.differences) == 1


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_segments_decode_alike_on_any_number_of_threads(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side by side or one after another: the same envelopes, and the same error, the first
    bad segment's in the mapping's order, whichever thread met it first."""
    monkeypatch.setattr(codec, "SEGMENT_BYTES_PER_THREAD", 1)  # threads even for these
    segments = {g: encode_state(make_envelope(seed=g)) for g in (3, 0, 7, 5)}
    got = decode_segments(segments, stream_id="s", threads=threads)
    assert list(got) == [3, 0, 7, 5]
    assert got == {g: make_envelope(seed=g) for g in segments}
    damaged = dict(segments)
    for g in (7, 0):
        flipped = bytearray(segments[g])
        flipped[-10] ^= 0x10
        damaged[g] = bytes(flipped)
    with pytest.raises(StateCorruptError, match="segment 0: state checksum mismatch"):
        decode_segments(damaged, stream_id="s", threads=threads)
