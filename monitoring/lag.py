"""Input lag of every registered stream, computed from Redis in bounded, pipelined passes.

For each stream in the registry (``sinkstream:streams``, most recently active first, at most
``max_streams``) one read-only Lua script, run on the stream's own shard (all its keys share
the ``{<id>}`` hash tag), returns: the committed ``last_entry_id`` and stored state bytes, the
meta status, the input length, the oldest *unapplied* entry id, the number of unapplied entries,
the dead-letter length and whether a worker holds the lease. Scripts are pipelined
``batch_size`` streams per round trip.

Cost per stream is O(1) when applied input is trimmed (the default, ``trim_applied_input``):
the oldest unapplied entry is then the stream's first entry and the count is ``XLEN``. With
trimming off, counting unapplied entries walks them server side, at most ``count_cap`` per
stream; a longer backlog is reported as ``count_cap`` (a lower bound; ``capped`` says so).

Ages are measured against Redis's own clock (``TIME``), since entry ids carry Redis's
milliseconds: a skewed exporter clock cannot invent lag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.ids import InvalidStreamId, entry_id_ms, validate_stream_id
from state_store.presence import live_slots
from state_store.replies import as_text
from state_store.scripts import STREAM_LAG, run_script_each

#: Upper bounds (seconds) of the per-stream oldest-unapplied-age histogram.
AGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
STATUSES = ("active", "idle", "ended", "failed")


@dataclass(frozen=True)
class StreamLag:
    stream_id: str
    status: str  # one of STATUSES
    pending: int
    capped: bool
    oldest_age_s: float  # 0 when nothing is pending
    state_bytes: int
    dead_letters: int
    #: the last input entry folded into the state (None: nothing applied yet)
    last_entry_id: str | None = None


@dataclass
class LagSnapshot:
    """Aggregates over all scanned streams: no per-stream series unless ``top`` is asked for."""

    taken_at: float  # Redis time, unix seconds
    streams: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    pending_entries: int = 0
    pending_capped_streams: int = 0
    oldest_age_s: float = 0.0
    age_buckets: list[int] = field(default_factory=lambda: [0] * (len(AGE_BUCKETS) + 1))
    age_sum_s: float = 0.0
    lagging_streams: int = 0
    state_bytes: int = 0
    dead_letters: int = 0
    scanned: int = 0
    registry_size: int = 0
    live_workers: int = 0  # task slots whose heartbeat has not expired (state_store/presence.py)
    top: list[StreamLag] = field(default_factory=list)

    def add(self, lag: StreamLag) -> None:
        self.scanned += 1
        self.streams[lag.status] += 1
        self.state_bytes += lag.state_bytes
        self.dead_letters += lag.dead_letters
        if lag.status == "failed" or lag.pending == 0:
            return  # a failed stream's backlog is reported as a failure, not as lag
        self.pending_entries += lag.pending
        self.pending_capped_streams += int(lag.capped)
        self.oldest_age_s = max(self.oldest_age_s, lag.oldest_age_s)
        self.lagging_streams += 1
        self.age_sum_s += lag.oldest_age_s
        for i, bound in enumerate(AGE_BUCKETS):
            if lag.oldest_age_s <= bound:
                self.age_buckets[i] += 1
        self.age_buckets[-1] += 1  # +Inf


class LagReader:
    """Computes :class:`LagSnapshot` s from one Redis client (bytes or str responses)."""

    def __init__(self, client: redis.Redis, *, max_streams: int = 100_000, batch_size: int = 500,
                 count_cap: int = 10_000, top_k: int = 0, read_only: bool = False) -> None:
        if max_streams < 1 or batch_size < 1 or count_cap < 1 or top_k < 0:
            raise ValueError("max_streams, batch_size and count_cap must be >= 1, top_k >= 0")
        self.client = client
        self.max_streams = max_streams
        self.batch_size = batch_size
        self.count_cap = count_cap
        self.top_k = top_k
        #: EVALSHA_RO (Redis >= 7): a user with read-only key rights (the gateway's) may read
        #: lag; an older server that lacks it gets EVALSHA
        self.command = "EVALSHA_RO" if read_only else "EVALSHA"

    def stream_ids(self) -> tuple[list[str], int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(STREAMS_REGISTRY)
        pipe.zrevrange(STREAMS_REGISTRY, 0, self.max_streams - 1)
        size, members = pipe.execute()
        ids = []
        for member in members:
            sid = as_text(member)
            try:
                ids.append(validate_stream_id(sid))
            except InvalidStreamId:
                continue  # never build keys from a foreign registry member
        return ids, int(size)

    def read(self) -> LagSnapshot:
        seconds, micros = self.client.time()
        now = float(seconds) + float(micros) / 1e6
        ids, size = self.stream_ids()
        live = live_slots(self.client, int(now * 1000))
        snapshot = LagSnapshot(taken_at=now, registry_size=size, live_workers=live)
        lags: list[StreamLag] = []
        for start in range(0, len(ids), self.batch_size):
            for lag in self.read_batch(ids[start : start + self.batch_size], now):
                snapshot.add(lag)
                if self.top_k and lag.pending and lag.status != "failed":
                    lags.append(lag)
        if self.top_k:
            lags.sort(key=lambda lag: (lag.oldest_age_s, lag.pending), reverse=True)
            snapshot.top = lags[: self.top_k]
        return snapshot

    def read_batch(self, ids: Sequence[str], now: float | None = None) -> list[StreamLag]:
        if now is None:
            seconds, micros = self.client.time()
            now = float(seconds) + float(micros) / 1e6
        out = []
        for sid, reply in zip(ids, self._run_scripts(ids), strict=True):
            committed, nbytes, status, ended, _length, oldest, pending, capped, dead, leased = (
                as_text(v) if isinstance(v, bytes) else v for v in reply
            )
            age = max(0.0, now - entry_id_ms(oldest) / 1000.0) if oldest else 0.0
            if status == "failed":
                state = "failed"
            elif int(pending) > 0 or int(leased):
                state = "active"
            elif ended:
                state = "ended"
            else:
                state = "idle"
            out.append(StreamLag(
                stream_id=sid, status=state, pending=int(pending), capped=bool(int(capped)),
                oldest_age_s=age if int(pending) else 0.0,
                state_bytes=int(nbytes or 0), dead_letters=int(dead),
                last_entry_id=committed or None,
            ))
        return out

    def _run_scripts(self, ids: Sequence[str]) -> list[Any]:
        """One ``STREAM_LAG`` per stream, pipelined; any error is raised."""
        calls = [((k.state, k.meta, k.input, k.dead, k.lease), (self.count_cap,))
                 for k in map(StreamKeys.of, ids)]
        replies = run_script_each(self.client, STREAM_LAG, calls, self.command)
        if self.command == "EVALSHA_RO" and any(
                isinstance(r, redis.ResponseError) and "unknown command" in str(r).lower()
                for r in replies):
            self.command = "EVALSHA"
            replies = run_script_each(self.client, STREAM_LAG, calls, self.command)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


def redis_memory(client: redis.Redis) -> dict[str, Any]:
    """used_memory, maxmemory and maxmemory_policy from INFO memory; {} if not available.

    Some managed Redis services and cluster proxies refuse or reshape INFO: the exporter then
    simply leaves these series out.
    """
    try:
        info: Any = client.info("memory")
    except redis.RedisError:
        return {}
    if not isinstance(info, dict) or "used_memory" not in info:
        return {}
    return {
        "used_memory": float(info.get("used_memory", 0)),
        "maxmemory": float(info.get("maxmemory", 0) or 0),
        "maxmemory_policy": as_text(info.get("maxmemory_policy", "unknown")),
    }
