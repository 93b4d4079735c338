"""Stream health in the ``meta`` hash: parked (failed) and deferred streams, and
refused-commit counters.

A stream whose state cannot be used (corrupt, foreign) is parked with a reason rather than
reset or retried in a loop; ``sinkstream status`` shows it and an operator clears it. A stream
a newer build wrote is deferred (left for an upgraded worker): the mark names the committed
state version it was met at, so it lapses by itself once anyone commits past it. Refused
commits are counted by the commit script itself (``commits_refused`` and
``commits_refused:<reason>``, reasons from :mod:`sinkstream.contracts.outcomes`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.replies import as_text

MAX_FAILURE_REASON = 4000


@dataclass(frozen=True)
class Failure:
    reason: str
    failed_at: float


@dataclass(frozen=True)
class Deferral:
    """Why workers leave a stream to an upgraded one, and since when."""

    reason: str
    deferred_at: float

    @classmethod
    def of(cls, meta: Mapping[str, str], version: int) -> Deferral | None:
        """The deferral in a stream's ``meta`` (decoded), if it still holds: marked at the
        committed state ``version`` (a commit since means an upgraded worker took it)."""
        if not meta.get("deferred_reason") or meta.get("deferred_version") != str(version):
            return None
        try:
            at = float(meta.get("deferred_at") or 0.0)
        except ValueError:
            at = 0.0
        return cls(meta["deferred_reason"], at)


def shown_status(status: str, deferral: Deferral | None) -> str:
    """A stream's status as ``status`` views show it: ``deferred`` while a deferral holds,
    unless the stream is parked (failed outranks it: someone must act)."""
    return "deferred" if deferral is not None and status != "failed" else status


class StreamHealth:
    """Failure marks and refusal counters of streams."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def mark_failed(self, stream_id: str, reason: str) -> None:
        """Park a stream (e.g. corrupt or foreign state); ``sinkstream status`` shows why."""
        self.client.hset(
            StreamKeys.of(stream_id).meta,
            mapping={
                "status": "failed",
                "failure_reason": reason[:MAX_FAILURE_REASON],
                "failed_at": repr(time.time()),
            },
        )

    def mark_deferred(self, stream_id: str, version: int, reason: str) -> None:
        """Note that a worker left the stream, at committed state ``version``, to an
        upgraded one (``Deferral.of`` reads it back while the version stands)."""
        self.client.hset(
            StreamKeys.of(stream_id).meta,
            mapping={
                "deferred_reason": reason[:MAX_FAILURE_REASON],
                "deferred_version": str(version),
                "deferred_at": repr(time.time()),
            },
        )

    def failure(self, stream_id: str) -> Failure | None:
        """The failure recorded by ``mark_failed``, or None if the stream is healthy."""
        status, reason, at = self.client.hmget(
            StreamKeys.of(stream_id).meta, ["status", "failure_reason", "failed_at"]
        )
        if status != b"failed":
            return None
        return Failure(reason=as_text(reason, "replace"), failed_at=float(at or 0.0))

    def clear_failure(self, stream_id: str) -> bool:
        """Mark the stream healthy again; True if it was failed."""
        meta = StreamKeys.of(stream_id).meta
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(meta, "status")
        pipe.hset(meta, "status", "ok")
        pipe.hdel(meta, "failure_reason", "failed_at")
        was, _, _ = pipe.execute()
        return bool(was == b"failed")

    def refused_commits(self, stream_id: str) -> dict[str, int]:
        """Refusal counters from ``meta``: {"total": n, "stale_fence": n, ...}."""
        raw = self.client.hgetall(StreamKeys.of(stream_id).meta)
        out: dict[str, int] = {}
        for name, value in raw.items():
            key = as_text(name)
            if key == "commits_refused":
                out["total"] = int(value)
            elif key.startswith("commits_refused:"):
                out[key.split(":", 1)[1]] = int(value)
        return out
