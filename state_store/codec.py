"""Engine states as bytes: a versioned, checksummed msgpack envelope with raw tensor bytes.

Layout (all integers big-endian)::

    magic          8 bytes   b"SNKSTATE"
    format version u16       1 (FORMAT_VERSION) or 2 (XXH3_VERSION): which digest follows
    flags          u16       0 (reserved: a future compression flag bumps the format)
    payload length u64       bytes that follow the header
    digest         16 bytes  over the 20 header bytes above plus the payload: blake2b-128
                             (version 1) or xxh3-128 (version 2)
    payload        msgpack map: engine, fingerprint, params, tokens_seen, last_entry_id,
                   scalars, tensors = [[name, dtype, [dims...], raw bytes], ...]

Why this shape: the state comes back from Redis, i.e. from outside the process, so decoding
must never execute anything (no pickle, no ``torch.load``), never trust a declared size and never
turn damage into a crash loop. Every check that bounds memory runs *before* the allocation it
guards: the total size against ``max_bytes``, the declared payload length against the bytes
present, the digest over everything, and only then msgpack with explicit container limits.
Every failure is a :class:`StateError` subclass whose message names the stream when the
caller passes ``stream_id``.

The digest is a checksum against damage (a truncated write, a bug, a key written by hand),
not a signature: whoever can write the key can write a matching digest. blake2b-128 runs at
~0.75 GB/s here, 60 ms of a 47 MB SmolLM2 window's ~95 ms load; xxh3-128 (``xxhash``) does
the same job ~15x faster. This build reads both and writes ``checksum`` (``state_checksum``,
blake2b by default): a worker of an earlier build reads only version 1, so a deployment
switches to xxh3 once every worker runs a build that reads it.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from sinkstream.contracts.formats import NewerFormatError, is_newer
from state_store.tensors import DTYPE_SIZES, RawTensor, StateSnapshot

MAGIC = b"SNKSTATE"
#: the format with a blake2b-128 digest, and the one with an xxh3-128 digest (same layout)
FORMAT_VERSION = 1
XXH3_VERSION = 2
#: ``state_checksum`` names -> the format version a state is written in
CHECKSUMS = {"blake2b": FORMAT_VERSION, "xxh3": XXH3_VERSION}
#: the newest format this build reads; a later one is an upgraded worker's (``StateTooNewError``)
NEWEST_VERSION = XXH3_VERSION
DIGEST_SIZE = 16
_PREFIX = struct.Struct(">8sHHQ")  # magic, format version, flags, payload length
HEADER_SIZE = _PREFIX.size + DIGEST_SIZE

#: Same default as ``Settings.max_state_bytes``.
DEFAULT_MAX_BYTES = 2 * 1024**3

#: Container limits for the metadata part of the payload. Tensor bytes are bounded by the
#: payload size itself; these stop a small hostile payload from asking for a huge list or map.
MAX_STR_LEN = 1024 * 1024
MAX_ARRAY_LEN = 1_000_000
MAX_MAP_LEN = 100_000
MAX_TENSORS = 100_000
MAX_NDIM = 16

_ENTRY_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_FIELDS = ("engine", "fingerprint", "params", "tokens_seen", "last_entry_id", "scalars", "tensors")


# ----- errors ----------------------------------------------------------------------------------
class StateError(Exception):
    """Base of every state decoding/compatibility error. ``reason`` is the bare explanation."""

    def __init__(self, reason: str, *, stream_id: str | None = None) -> None:
        self.reason = reason
        self.stream_id = stream_id
        super().__init__(f"stream {stream_id!r}: {reason}" if stream_id is not None else reason)


class StateCorruptError(StateError):
    """The bytes claim to be our state but are damaged: truncated, checksum or structure."""


class StateFormatError(StateError):
    """Not our state at all (foreign magic) or a format version/flags this build cannot read."""


class StateTooNewError(StateFormatError, NewerFormatError):
    """A format version newer than this build reads: an upgraded worker wrote it."""

    def __init__(self, version: int, *, stream_id: str | None = None) -> None:
        super().__init__(self._newer("state", version, NEWEST_VERSION), stream_id=stream_id)


class StateTooLargeError(StateError):
    """The state (or its declared size) exceeds the configured ``max_bytes``."""


class ForeignStateError(StateError):
    """A valid state that belongs to another engine, model or parameter set."""

    def __init__(
        self, reason: str, *, stream_id: str | None = None, differences: tuple[str, ...] = ()
    ) -> None:
        super().__init__(reason, stream_id=stream_id)
        self.differences = differences


# ----- envelope --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateEnvelope:
    """Everything stored for one stream's engine state.

    ``params`` and ``snapshot.scalars`` must be msgpack-serialisable (str, int, float, bool,
    None, bytes, lists/tuples and str-keyed dicts of those); tuples come back as lists.
    """

    engine: str
    fingerprint: str
    params: dict[str, Any]
    tokens_seen: int
    last_entry_id: str | None
    snapshot: StateSnapshot = field(repr=False)


def encode_state(
    envelope: StateEnvelope, *, max_bytes: int | None = None, checksum: str = "blake2b"
) -> bytes:
    """Serialise ``envelope`` with the ``checksum`` digest ("blake2b" or "xxh3"); raise
    StateTooLargeError past ``max_bytes`` (None: no limit)."""
    version = CHECKSUMS.get(checksum)
    if version is None:
        raise ValueError(f"unknown state checksum {checksum!r} (one of {sorted(CHECKSUMS)})")
    _check_envelope_fields(envelope)
    payload = _pack_payload(envelope)
    if max_bytes is not None and HEADER_SIZE + len(payload) > max_bytes:
        raise StateTooLargeError(
            f"encoded state is {HEADER_SIZE + len(payload)} bytes, limit is {max_bytes}"
        )
    return seal(payload, format_version=version)


def seal(payload: bytes, *, format_version: int = FORMAT_VERSION, flags: int = 0) -> bytes:
    """Wrap a msgpack payload in the header (magic, version, length, digest).

    Public so tests can build well-sealed but hostile payloads; production code calls
    :func:`encode_state`.
    """
    prefix = _PREFIX.pack(MAGIC, format_version, flags, len(payload))
    return b"".join((prefix, _digest(prefix, payload, format_version), payload))


def decode_state(
    data: bytes | bytearray | memoryview,
    *,
    stream_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> StateEnvelope:
    """Parse bytes written by :func:`encode_state`.

    Raises StateTooLargeError, StateFormatError or StateCorruptError (all StateError), never
    another exception, for any input.
    """
    view = memoryview(data).cast("B")
    payload = _open_header(view, stream_id, max_bytes)
    obj = _unpack_payload(payload, stream_id)
    try:
        return _envelope_from(obj)
    except _Invalid as exc:
        raise StateCorruptError(f"invalid state structure: {exc}", stream_id=stream_id) from None


def decode_segment(
    data: bytes | bytearray | memoryview,
    *,
    segment: int,
    stream_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> StateEnvelope:
    """One segment of a segmented state (``state_layout = "segments"``): the same envelope and
    the same checks (each segment carries its own digest), errors name the segment too."""
    try:
        return decode_state(data, stream_id=stream_id, max_bytes=max_bytes)
    except StateTooNewError:
        raise  # the whole state is an upgraded worker's, whichever segment said so
    except StateError as exc:
        raise type(exc)(f"segment {segment}: {exc.reason}", stream_id=stream_id) from None


#: the fewest segment bytes worth a thread of their own: 17 segments of 20 KB decode in 0.7 ms
#: on one thread and 1.4 ms on two; of 200 KB, in 5.5 and 3.7 ms
SEGMENT_BYTES_PER_THREAD = 512 * 1024


def decode_segments(
    segments: Mapping[int, bytes | bytearray | memoryview],
    *,
    stream_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    threads: int = 1,
) -> dict[int, StateEnvelope]:
    """Every segment of a segmented state through :func:`decode_segment`, on up to
    ``threads`` threads. Checking the digest is most of a segment's cost and releases the
    GIL (hashlib and xxhash do for large buffers), so a window's segments are checked side
    by side on cores a loading worker leaves idle; each thread gets at least
    ``SEGMENT_BYTES_PER_THREAD`` (starting threads costs more than hashing a small window).
    Raises what decoding them one after another would: the error of the first bad segment,
    in the mapping's order."""
    items = list(segments.items())
    threads = min(threads, sum(len(data) for _, data in items) // SEGMENT_BYTES_PER_THREAD)
    if threads < 2 or len(items) < 2:
        return {g: decode_segment(data, segment=g, stream_id=stream_id, max_bytes=max_bytes)
                for g, data in items}
    with ThreadPoolExecutor(max_workers=min(threads, len(items)),
                            thread_name_prefix="segment-decode") as pool:
        futures = [pool.submit(decode_segment, data, segment=g, stream_id=stream_id,
                               max_bytes=max_bytes) for g, data in items]
    return {g: future.result() for (g, _), future in zip(items, futures, strict=True)}


def check_compatible(
    envelope: StateEnvelope,
    engine_kind: str,
    fingerprint: str,
    params: Mapping[str, Any],
    *,
    stream_id: str | None = None,
) -> None:
    """Raise ForeignStateError naming every field where the stored state differs from ours.

    ``params`` are normalised through msgpack first, so a tuple here equals the list stored.
    """
    diffs: list[str] = []
    if envelope.engine != engine_kind:
        diffs.append(f"engine: stored {envelope.engine!r}, this worker {engine_kind!r}")
    if envelope.fingerprint != fingerprint:
        diffs.append(
            f"fingerprint: stored {envelope.fingerprint[:16]!r}, this worker {fingerprint[:16]!r}"
        )
    ours = _normalise(dict(params))
    for name in sorted(set(envelope.params) | set(ours)):
        stored = envelope.params.get(name, "<missing>")
        mine = ours.get(name, "<missing>")
        if stored != mine:
            diffs.append(f"params.{name}: stored {stored!r}, this worker {mine!r}")
    if diffs:
        raise ForeignStateError(
            "state belongs to another engine, model or parameter set: " + "; ".join(diffs),
            stream_id=stream_id,
            differences=tuple(diffs),
        )


# ----- encoding helpers ------------------------------------------------------------------------
def _check_envelope_fields(env: StateEnvelope) -> None:
    if not isinstance(env.engine, str) or not isinstance(env.fingerprint, str):
        raise TypeError("engine and fingerprint must be strings")
    if isinstance(env.tokens_seen, bool) or not isinstance(env.tokens_seen, int):
        raise TypeError("tokens_seen must be an int")
    if env.tokens_seen < 0:
        raise ValueError("tokens_seen must be >= 0")
    if env.last_entry_id is not None and not _ENTRY_ID_RE.fullmatch(env.last_entry_id):
        raise ValueError(f"last_entry_id {env.last_entry_id!r} is not a stream entry id")


def _pack_payload(env: StateEnvelope) -> bytes:
    tensors = [
        [name, t.dtype, list(t.shape), t.data] for name, t in env.snapshot.tensors.items()
    ]
    obj = {
        "engine": env.engine,
        "fingerprint": env.fingerprint,
        "params": env.params,
        "tokens_seen": env.tokens_seen,
        "last_entry_id": env.last_entry_id,
        "scalars": env.snapshot.scalars,
        "tensors": tensors,
    }
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"state params/scalars must be msgpack-serialisable: {exc}") from exc


def _normalise(value: dict[str, Any]) -> dict[str, Any]:
    """The value as it reads back after a msgpack round trip (tuples become lists)."""
    packed = msgpack.packb(value, use_bin_type=True)
    return msgpack.unpackb(packed, raw=False)


def _digest(prefix: bytes | memoryview, payload: bytes | memoryview, version: int) -> bytes:
    """The 16-byte digest of format ``version`` (xxh3-128 for ``XXH3_VERSION``, else
    blake2b-128) over the header prefix and the payload."""
    h = xxhash.xxh3_128() if version == XXH3_VERSION else \
        hashlib.blake2b(digest_size=DIGEST_SIZE)
    h.update(prefix)
    h.update(payload)
    return h.digest()


# ----- decoding helpers ------------------------------------------------------------------------
class _Invalid(ValueError):
    """Internal: payload structure is wrong; becomes StateCorruptError."""


def _open_header(view: memoryview, stream_id: str | None, max_bytes: int) -> memoryview:
    """Validate header, size and digest; return the payload view (no copy)."""
    size = len(view)
    if size > max_bytes:
        raise StateTooLargeError(
            f"state is {size} bytes, limit is {max_bytes}", stream_id=stream_id
        )
    if size < HEADER_SIZE:
        head = bytes(view[: len(MAGIC)])
        if MAGIC.startswith(head):
            raise StateCorruptError(
                f"state truncated: {size} bytes, the header alone needs {HEADER_SIZE}",
                stream_id=stream_id,
            )
        raise StateFormatError("not a sinkstream state (unknown magic bytes)", stream_id=stream_id)
    magic, version, flags, length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise StateFormatError(
            f"not a sinkstream state (magic {magic!r}, expected {MAGIC!r})", stream_id=stream_id
        )
    if is_newer(version, NEWEST_VERSION):
        raise StateTooNewError(version, stream_id=stream_id)
    if version not in (FORMAT_VERSION, XXH3_VERSION):
        raise StateFormatError(
            f"state format version {version} is not supported (this build reads "
            f"{FORMAT_VERSION} and {XXH3_VERSION})",
            stream_id=stream_id,
        )
    if flags != 0:
        raise StateFormatError(f"unsupported state flags {flags:#06x}", stream_id=stream_id)
    if length > max_bytes:
        raise StateTooLargeError(
            f"state declares a {length}-byte payload, limit is {max_bytes}", stream_id=stream_id
        )
    present = size - HEADER_SIZE
    if length != present:
        what = "truncated" if present < length else "has trailing bytes"
        raise StateCorruptError(
            f"state {what}: header declares {length} payload bytes, {present} present",
            stream_id=stream_id,
        )
    payload = view[HEADER_SIZE:]
    stored = bytes(view[_PREFIX.size : HEADER_SIZE])
    computed = _digest(view[: _PREFIX.size], payload, version)
    if stored != computed:
        raise StateCorruptError(
            f"state checksum mismatch (stored {stored.hex()}, computed {computed.hex()})",
            stream_id=stream_id,
        )
    return payload


def _unpack_payload(payload: memoryview, stream_id: str | None) -> Any:
    n = len(payload)
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=n,
            max_str_len=min(MAX_STR_LEN, n),
            max_array_len=min(MAX_ARRAY_LEN, n),
            max_map_len=min(MAX_MAP_LEN, n // 2),
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise StateCorruptError(
            f"state payload is not valid msgpack: {exc}", stream_id=stream_id
        ) from None


def _envelope_from(obj: Any) -> StateEnvelope:
    if not isinstance(obj, dict):
        raise _Invalid(f"payload is a {type(obj).__name__}, expected a map")
    missing = [name for name in _FIELDS if name not in obj]
    if missing:
        raise _Invalid(f"missing fields {missing}")
    engine = _typed(obj, "engine", str)
    fingerprint = _typed(obj, "fingerprint", str)
    params = _typed(obj, "params", dict)
    scalars = _typed(obj, "scalars", dict)
    tokens_seen = obj["tokens_seen"]
    if isinstance(tokens_seen, bool) or not isinstance(tokens_seen, int) or tokens_seen < 0:
        raise _Invalid(f"tokens_seen {tokens_seen!r} is not a non-negative int")
    last = obj["last_entry_id"]
    if last is not None and not (isinstance(last, str) and _ENTRY_ID_RE.fullmatch(last)):
        raise _Invalid(f"last_entry_id {last!r} is not a stream entry id")
    tensors = _tensors_from(_typed(obj, "tensors", list))
    return StateEnvelope(
        engine=engine,
        fingerprint=fingerprint,
        params=params,
        tokens_seen=tokens_seen,
        last_entry_id=last,
        snapshot=StateSnapshot(tensors=tensors, scalars=scalars),
    )


def _typed(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj[name]
    if not isinstance(value, kind):
        raise _Invalid(f"{name} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _tensors_from(items: list[Any]) -> dict[str, RawTensor]:
    if len(items) > MAX_TENSORS:
        raise _Invalid(f"{len(items)} tensors, at most {MAX_TENSORS}")
    out: dict[str, RawTensor] = {}
    for item in items:
        name, raw = _tensor_from(item)
        if name in out:
            raise _Invalid(f"duplicate tensor {name!r}")
        out[name] = raw
    return out


def _tensor_from(item: Any) -> tuple[str, RawTensor]:
    if not (isinstance(item, list) and len(item) == 4):
        raise _Invalid("tensor entry is not [name, dtype, shape, data]")
    name, dtype, shape, data = item
    if not isinstance(name, str):
        raise _Invalid("tensor name is not a string")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _Invalid(f"tensor {name!r}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _Invalid(f"tensor {name!r}: shape is not a list of at most {MAX_NDIM} dims")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Invalid(f"tensor {name!r}: shape {shape!r} has a non-integer or negative dim")
    if not isinstance(data, bytes):
        raise _Invalid(f"tensor {name!r}: data is not raw bytes")
    # Python ints cannot overflow, and at most MAX_NDIM dims bound the product's size.
    expected = DTYPE_SIZES[dtype] * math.prod(shape)
    if expected != len(data):
        raise _Invalid(
            f"tensor {name!r}: dtype {dtype} and shape {shape} need {expected} bytes, "
            f"{len(data)} present"
        )
    return name, RawTensor(dtype=dtype, shape=tuple(shape), data=data)
