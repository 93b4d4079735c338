"""Publish text onto a stream's input: idempotent retries, backpressure, size-safe chunks.

Why it is built this way:

* **Idempotent retries.** A connection error after Redis ran a command but before the reply
  arrived leaves the producer unsure whether its entries landed. Each :class:`Producer` has a
  random id and numbers its entries per stream (1, 2, 3, ...). The append runs in one Lua
  script (``state_store.scripts.PRODUCER_APPEND``) that writes only entries numbered above the
  last number recorded for that producer in ``sinkstream:{<id>}:producers`` and records the
  new number, atomically. A retry resends the same numbered batch, so entries that did land
  are skipped: no duplicates, no gaps. Entries not yet confirmed stay *pending* in the
  Producer and go first on its next call, even after an exception escaped to the caller.
  The entries themselves stay plain contract fields (``text``, ``speaker``, ``ts``, ``eos``).
* **Backpressure.** The same script refuses to grow a stream past ``max_stream_length``
  entries; the caller then blocks (polling with backoff, one log line per interval) or raises
  :class:`StreamFullError` (``on_full="fail"``). Nothing is ever dropped.
* **Size.** Texts over ``max_entry_bytes`` are split at whitespace (UTF-8 safe; a word longer
  than the limit is cut at a character boundary); ``"".join`` of the chunks is the text.
* **Registry.** After each append the stream id is ZADDed to ``sinkstream:streams`` (last
  activity) and ``ZADD NX`` to ``sinkstream:runnable`` (work to schedule). Those keys live on
  other cluster slots, so they are pipelined after the script, not inside it; both are
  idempotent, so retries are harmless.
* **Wake-up.** In the same round trip the stream id is PUBLISHed on ``sinkstream:wake``
  (one message per script call, not per entry), so the leading dispatcher schedules the
  stream at once instead of at its next full pass over every stream. It is only a hint: a
  lost message costs at most one ``dispatch_interval_seconds``; a server that refuses it (an
  ACL without ``+publish``) turns it off for this Producer, with one warning.

A Producer is safe to share between threads (calls are serialised) but not between
processes: give each process its own.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import redis

from producer.encoding import EncodedEntry, TurnLike, encode_turn
from sinkstream.contracts.keys import RUNNABLE, STREAMS_REGISTRY, WAKE_CHANNEL, StreamKeys
from sinkstream.contracts.kinds import META_FIELD as KIND_FIELD
from sinkstream.contracts.kinds import StreamKind, parse_kind
from sinkstream.settings import Settings, load_settings
from state_store.connection import Backoff, redis_from_settings, retry_call
from state_store.scripts import PRODUCER_APPEND

log = logging.getLogger(__name__)

_PRODUCERS_TTL_S = 7 * 24 * 3600
_FULL_LOG_INTERVAL_S = 30.0
#: While Redis is unreachable, one WARNING per stream per this many seconds (not per attempt).
_RETRY_WARN_EVERY_S = 10.0
_BATCH_BYTES = 1 << 20


class StreamFullError(RuntimeError):
    """The input stream is at ``max_stream_length`` and ``on_full="fail"``."""

    def __init__(self, stream_id: str, length: int, limit: int, pending: int) -> None:
        self.stream_id = stream_id
        self.length = length
        self.limit = limit
        self.pending = pending
        super().__init__(
            f"input stream {StreamKeys.of(stream_id).input} is full ({length}/{limit} entries). "
            "Workers trim entries once applied, so start or scale workers, raise "
            "SINKSTREAM_MAX_STREAM_LENGTH, or set SINKSTREAM_ON_FULL=block to wait. "
            f"{pending} entries were not published; they stay pending in this Producer and are "
            "sent first on its next call (or flush())."
        )


@dataclass
class PublishResult:
    """What one call published. ``entries`` counts entries confirmed in the stream (split
    chunks and the end marker included); ``duplicates`` how many of them an attempt whose
    reply was lost had already appended (the retry skipped them rather than doubling them)."""

    entries: int = 0
    duplicates: int = 0
    last_id: str | None = None


#: A numbered entry: (seq, (seq as text, text, speaker, ts, eos)) with "" for absent fields;
#: a plain tuple because a batch holds thousands of them.
_Entry = tuple[int, tuple[str, bytes, bytes, str, str]]


@dataclass
class _Reply:
    last_seq: int
    added: int
    duplicates: int
    full: bool
    length: int
    last_id: str


def attempts_for(seconds: float, base: float = 0.1, cap: float = 5.0) -> int:
    """Attempts of :func:`retry_call` (defaults) whose shortest possible waits add up to
    ``seconds``: the backoff waits at least half of each ceiling (``Backoff``)."""
    attempts, waited = 1, 0.0
    while waited < seconds:
        waited += min(cap, base * 2 ** (attempts - 1)) / 2
        attempts += 1
    return max(attempts, 2)


class Producer:
    """Publishes to any number of streams over one Redis connection pool.

    ``client`` defaults to one built from ``settings`` (which default to the environment).
    ``producer_id`` defaults to a random 64-bit id; pass a stable one only if a single
    process uses it at a time (numbering then resumes from what Redis recorded).
    ``mark_runnable=False`` leaves the scheduling hints out: no ``sinkstream:runnable`` mark
    and no wake-up message, so the appended entries are found by the dispatcher's next full
    pass only (``dispatch_interval_seconds``), as for a raw ``XADD``; the stream is still
    registered. Without it (or with ``dispatch_wake = false``) no wake-up is published.
    """

    def __init__(
        self,
        client: redis.Redis | None = None,
        *,
        settings: Settings | None = None,
        producer_id: str | None = None,
        on_full: Literal["block", "fail"] | None = None,
        batch_entries: int = 1000,
        block_timeout: float | None = None,
        retry_attempts: int | None = None,
        mark_runnable: bool = True,
    ) -> None:
        self.settings = settings or load_settings()
        self._own_client = client is None
        self.client = client if client is not None else redis_from_settings(
            self.settings, client_name="sinkstream-producer"
        )
        self._fixed_id = producer_id is not None
        self.producer_id = producer_id or secrets.token_hex(8)
        self.on_full = on_full or self.settings.on_full
        self.batch_entries = max(1, batch_entries)
        self.block_timeout = block_timeout
        # default: enough attempts (0.1 s doubling to 5 s) to cover producer_retry_seconds
        self.retry_attempts = retry_attempts if retry_attempts is not None else \
            attempts_for(self.settings.producer_retry_seconds)
        self.mark_runnable = mark_runnable
        self.wake = mark_runnable and self.settings.dispatch_wake
        self._sha: str | None = None
        self._next_seq: dict[str, int] = {}
        self._pending: dict[str, list[_Entry]] = {}
        self._lock = threading.RLock()
        self._full_logged: dict[str, float] = {}

    # --- public API ------------------------------------------------------------------------

    def publish(
        self, stream: str, text: str, speaker: str | None = None, ts: float | None = None
    ) -> str:
        """Append one turn (several entries if over ``max_entry_bytes``); return the last id."""
        result = self.publish_many(stream, [(text, speaker, ts)])
        assert result.last_id is not None
        return result.last_id

    def set_kind(self, stream: str, kind: StreamKind) -> None:
        """Declare what ``stream`` carries (``meeting`` or ``log``), before or while publishing.

        One HSET on the stream's meta hash (``sinkstream.contracts.kinds``): workers read it
        with every batch, so it applies from the next batch on; entries already applied stay
        as they were read. Idempotent, so a retry or every producer of the stream may set it.
        """
        checked = parse_kind(kind)
        if checked is None:
            raise ValueError("kind is empty; use 'meeting' or 'log'")
        keys = StreamKeys.of(stream)
        retry_call(lambda: self.client.hset(keys.meta, KIND_FIELD, checked),
                   what=f"setting the kind of stream {stream!r}", attempts=self.retry_attempts)

    def publish_many(
        self,
        stream: str,
        turns: Iterable[TurnLike],
        *,
        eos: bool = False,
        on_progress: Callable[[int], None] | None = None,
    ) -> PublishResult:
        """Append turns in order, ``batch_entries`` (or about 1 MiB) per script call, so one
        call never holds Redis for long; optionally end the stream.

        ``turns`` may be a generator (it is consumed batch by batch). ``on_progress(n)`` is
        called after each batch with the number of turns it confirmed.
        """
        keys = StreamKeys.of(stream)
        result = PublishResult()
        with self._lock:
            self._flush_stream(keys, result)
            batch: list[_Entry] = []
            consumed = batch_bytes = 0
            limit = self.settings.max_entry_bytes
            for index, turn in enumerate(turns):
                try:
                    fields = encode_turn(turn, limit)
                except (TypeError, ValueError) as exc:
                    # publish what came before, in order, then say which turn is wrong
                    if batch:
                        self._send(keys, batch, result)
                    raise type(exc)(f"turn {index}: {exc}") from None
                batch.extend(self._number(keys.stream_id, fields))
                batch_bytes += sum(len(f[0]) for f in fields)
                consumed += 1
                if len(batch) >= self.batch_entries or batch_bytes >= _BATCH_BYTES:
                    self._send(keys, batch, result)
                    batch = []
                    batch_bytes = 0
                    if on_progress is not None:
                        on_progress(consumed)
                    consumed = 0
            if eos:
                batch.extend(self._number(keys.stream_id, [(b"", b"", "")], eos="1"))
            if batch:
                self._send(keys, batch, result)
            if on_progress is not None and consumed:
                on_progress(consumed)
        return result

    def end_stream(self, stream: str, text: str = "") -> str:
        """Append the end-of-stream marker (``eos=1``, optionally with a last text)."""
        keys = StreamKeys.of(stream)
        result = PublishResult()
        with self._lock:
            self._flush_stream(keys, result)
            fields = encode_turn(text, self.settings.max_entry_bytes) if text else []
            entries = self._number(keys.stream_id, fields)
            entries.extend(self._number(keys.stream_id, [(b"", b"", "")], eos="1"))
            self._send(keys, entries, result)
        assert result.last_id is not None
        return result.last_id

    @property
    def pending(self) -> int:
        """Entries numbered but not yet confirmed by Redis (sent first on the next call)."""
        return sum(len(entries) for entries in self._pending.values())

    def flush(self) -> PublishResult:
        """Send every pending entry (after an error escaped an earlier call)."""
        result = PublishResult()
        with self._lock:
            for stream_id in list(self._pending):
                self._flush_stream(StreamKeys.of(stream_id), result)
        return result

    def close(self) -> None:
        """Flush, then forget this producer's sequence records (keeps the hash small).

        Records are dropped only for streams with nothing pending; the hash's TTL
        (7 days of inactivity) removes the rest eventually.
        """
        with self._lock:
            try:
                self.flush()
            finally:
                self._forget()
                if self._own_client:
                    self.client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- encoding --------------------------------------------------------------------------

    def _number(self, stream_id: str, fields: list[EncodedEntry], eos: str = "") -> list[_Entry]:
        """Give entries this producer's next sequence numbers for ``stream_id``."""
        seq = self._next_seq.get(stream_id)
        if seq is None:
            seq = self._first_seq(stream_id)
        out: list[_Entry] = []
        for text, speaker, ts in fields:
            out.append((seq, (str(seq), text, speaker, ts, eos)))
            seq += 1
        self._next_seq[stream_id] = seq
        return out

    def _first_seq(self, stream_id: str) -> int:
        """1 for a random id; for a caller-chosen id, continue after what Redis recorded."""
        if not self._fixed_id:
            return 1
        key = StreamKeys.of(stream_id).producers
        record = retry_call(
            lambda: self.client.hget(key, self.producer_id),
            what=f"reading producer record of {stream_id}",
            attempts=self.retry_attempts,
        )
        if not record:
            return 1
        raw = record.decode() if isinstance(record, bytes) else str(record)
        return int(raw.split(" ", 1)[0]) + 1

    # --- sending ---------------------------------------------------------------------------

    def _flush_stream(self, keys: StreamKeys, result: PublishResult) -> None:
        if self._pending.get(keys.stream_id):
            self._send(keys, [], result)

    def _send(self, keys: StreamKeys, batch: list[_Entry], result: PublishResult) -> None:
        """Append pending + ``batch`` until all are confirmed, riding out outages and
        blocking (or failing) while the stream is full."""
        pending = self._pending.setdefault(keys.stream_id, [])
        pending.extend(batch)
        blocked_since: float | None = None
        backoff = Backoff(base=0.05, cap=2.0)
        while pending:
            reply = retry_call(
                lambda: self._append(keys, pending),
                what=f"publishing to {keys.input}",
                attempts=self.retry_attempts,
                warn_every_s=_RETRY_WARN_EVERY_S,
            )
            result.entries += reply.added + reply.duplicates
            result.duplicates += reply.duplicates
            if reply.last_id:
                result.last_id = reply.last_id
            pending[:] = [e for e in pending if e[0] > reply.last_seq]
            if not pending:
                break
            if not reply.full:
                raise RuntimeError(
                    f"{keys.input}: producer {self.producer_id} record is at seq "
                    f"{reply.last_seq} but {len(pending)} entries remain unconfirmed"
                )
            now = time.monotonic()
            if self.on_full == "fail":
                raise StreamFullError(keys.stream_id, reply.length, self._max_len, len(pending))
            if blocked_since is None:
                blocked_since = now
            waited = now - blocked_since
            if self.block_timeout is not None and waited >= self.block_timeout:
                raise StreamFullError(keys.stream_id, reply.length, self._max_len, len(pending))
            self._log_full(keys, reply.length, len(pending), now)
            time.sleep(backoff.next_delay())
        self._pending.pop(keys.stream_id, None)

    def _log_full(self, keys: StreamKeys, length: int, pending: int, now: float) -> None:
        """One WARNING per stream per interval while blocked, however many polls and calls."""
        last = self._full_logged.get(keys.stream_id)
        if last is not None and now - last < _FULL_LOG_INTERVAL_S:
            return
        self._full_logged[keys.stream_id] = now
        log.warning(
            "%s is full (%d/%d entries); waiting for workers to consume it (%d entries pending)",
            keys.input, length, self._max_len, pending,
        )

    @property
    def _max_len(self) -> int:
        return self.settings.max_stream_length

    def _append(self, keys: StreamKeys, entries: list[_Entry]) -> _Reply:
        """One script call for ``entries`` (plus the registry updates), loading the script
        if this server has not seen it (first use, or after a restart emptied its cache)."""
        argv: list[str | bytes] = [
            self.producer_id, str(self._max_len), str(_PRODUCERS_TTL_S * 1000)
        ]
        for _, args in entries:
            argv.extend(args)
        if self._sha is None:
            self._sha = str(self.client.script_load(PRODUCER_APPEND))
        try:
            raw = self._run(keys, argv)
        except redis.exceptions.NoScriptError:
            self._sha = str(self.client.script_load(PRODUCER_APPEND))
            raw = self._run(keys, argv)
        last_id = raw[5]
        return _Reply(
            last_seq=int(raw[0]), added=int(raw[1]), duplicates=int(raw[2]),
            full=bool(raw[3]), length=int(raw[4]),
            last_id=last_id.decode() if isinstance(last_id, bytes) else str(last_id),
        )

    def _run(self, keys: StreamKeys, argv: list[str | bytes]) -> list[Any]:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        # EVALSHA via execute_command: redis-py's cluster pipeline blocks the .evalsha() method
        # but routes the raw command by its keys (one slot: the stream's hash tag)
        pipe.execute_command("EVALSHA", self._sha, 2, keys.input, keys.producers, *argv)
        pipe.zadd(STREAMS_REGISTRY, {keys.stream_id: now})
        if self.mark_runnable:
            pipe.zadd(RUNNABLE, {keys.stream_id: now}, nx=True)
        wake = self.wake
        if wake:
            # execute_command for the same reason as EVALSHA: the cluster pipeline blocks
            # .publish(); any node will do, a cluster forwards PUBLISH to every node
            pipe.execute_command("PUBLISH", WAKE_CHANNEL, keys.stream_id)
        replies = pipe.execute(raise_on_error=False)
        if wake and isinstance(replies[-1], redis.ResponseError):
            self._wake_refused(replies.pop())
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies[0])

    def _wake_refused(self, exc: redis.ResponseError) -> None:
        """The append landed but the wake-up was refused (e.g. an ACL user without
        ``+publish`` on ``sinkstream:wake``): stop sending it; the dispatcher's full pass
        still finds this producer's input, only later."""
        self.wake = False
        log.warning("producer %s: %s refused (%s); appends no longer wake the dispatcher, "
                    "so new input waits for its next full pass (dispatch_interval_seconds)",
                    self.producer_id, WAKE_CHANNEL, exc)

    def _forget(self) -> None:
        streams = [s for s in self._next_seq if not self._pending.get(s)]
        if not streams:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for stream_id in streams:
                pipe.hdel(StreamKeys.of(stream_id).producers, self.producer_id)
            pipe.execute()
        except redis.RedisError as exc:  # best effort: the TTL cleans up
            log.debug("could not forget producer %s: %s", self.producer_id, exc)


# --- module-level convenience --------------------------------------------------------------

_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """A process-wide Producer built from the environment's settings, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Producer()
        return _default


def publish(stream: str, text: str, speaker: str | None = None, ts: float | None = None) -> str:
    """Append one turn to ``stream`` with the default producer; return the last entry id."""
    return default_producer().publish(stream, text, speaker, ts)


def publish_many(stream: str, turns: Iterable[TurnLike], *, eos: bool = False) -> PublishResult:
    """Append many turns (pipelined in batches) with the default producer."""
    return default_producer().publish_many(stream, turns, eos=eos)


def end_stream(stream: str, text: str = "") -> str:
    """Mark the end of ``stream`` with the default producer."""
    return default_producer().end_stream(stream, text)
