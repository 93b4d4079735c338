"""A stream's status and the tenant's stream list, as the API returns them.

The numbers are the exporter's (``monitoring.lag``: one read-only script on the stream's
shard) plus the state head and the stream's meta hash, so ``GET /v1/streams/{id}``,
``sinkstream status`` and the Grafana lag panels agree.
"""

from __future__ import annotations

from typing import Any

import redis

from monitoring.lag import LagReader
from producer.registry import StreamInfo, describe_streams
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.gateway.auth import ALL_STREAMS, Principal
from state_store.health import Deferral, shown_status
from state_store.replies import as_text, text_fields
from state_store.store import StateStore


def stream_known(client: redis.Redis, stream_id: str) -> bool:
    """Registered, or with input, output or state in Redis (a raw XADD registers nothing)."""
    keys = StreamKeys.of(stream_id)
    pipe = client.pipeline(transaction=False)
    pipe.zscore(STREAMS_REGISTRY, stream_id)
    pipe.exists(keys.input, keys.output, keys.state)
    score, count = pipe.execute()
    return score is not None or int(count) > 0


def stream_status(client: redis.Redis, stream_id: str) -> dict[str, Any]:
    """Status, committed offset, lag, tokens, state bytes, dead letters, last summary."""
    keys = StreamKeys.of(stream_id)
    lag = LagReader(client, read_only=True).read_batch([stream_id])[0]
    info = StateStore(client).info(stream_id)
    meta = text_fields(client.hgetall(keys.meta), "replace")
    last_summary = meta.get("last_summary_ts")
    deferral = Deferral.of(meta, info.version if info else 0)
    return {
        "stream": stream_id,
        "status": shown_status(lag.status, deferral),
        "offset": lag.last_entry_id,
        "lag_entries": lag.pending,
        "lag_capped": lag.capped,
        "oldest_unapplied_s": round(lag.oldest_age_s, 3),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
        "state_bytes": lag.state_bytes,
        "version": info.version if info else 0,
        "last_summary_ts": float(last_summary) if last_summary else None,
        "dead_letters": lag.dead_letters,
        "failure": meta.get("failure_reason") or None,
        "deferred": deferral.reason if deferral else None,
    }


def tenant_streams(client: redis.Redis, who: Principal, limit: int) -> list[StreamInfo]:
    """The most recently active streams this token covers, newest first: the registry is
    scanned by prefix (ZSCAN MATCH), so a tenant never sees, or pays for, other tenants'
    streams beyond the scan itself."""
    if ALL_STREAMS in who.prefixes:
        members: Any = client.zrevrange(STREAMS_REGISTRY, 0, max(0, limit - 1), withscores=True)
        pairs = [(as_text(m, "replace"), float(s)) for m, s in members]
    else:
        found: dict[str, float] = {}
        for prefix in who.prefixes:
            for member, score in client.zscan_iter(STREAMS_REGISTRY, match=f"{prefix}*",
                                                   count=1000):
                found[as_text(member, "replace")] = float(score)
        pairs = sorted(found.items(), key=lambda p: p[1], reverse=True)[:limit]
    return describe_streams(client, [(s, score) for s, score in pairs if who.covers(s)])
