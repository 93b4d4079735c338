"""The beginning and the end of a batch on Redis, one round trip each.

``claim`` takes a stream for a task: it refreshes the stream's scheduled flag, refuses a parked
stream, takes the lease with a new fencing token and reads the state head the batch starts
from and commits against (``batch_claim.lua``). ``release`` gives the stream back and settles
its scheduled flag: kept for the next task when input is left, dropped when the stream is
caught up, and set again at once when input arrived meanwhile (``batch_release.lua``).

The dispatcher's side of the flag (``SET NX`` before it enqueues a task) stays with
``workers/scheduling``; this is the task's side of the same protocol, folded into the lease
scripts so a batch costs four round trips on a hot state (claim, read, commit, release) where
it cost eleven.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store import scripts
from state_store.lease import Lease, check_worker_id, ttl_ms
from state_store.reads import StateHead, parse_head
from state_store.replies import as_text

#: what ``release`` does with the scheduled flag: ``continue`` (input is left: keep it, the
#: caller enqueues the next task), ``done`` (caught up: drop it, or set it again for input that
#: arrived meanwhile), ``keep`` (leave it: a companion stream, or a batch cut short)
Then = Literal["continue", "done", "keep"]


@dataclass(frozen=True)
class Claimed:
    """A stream taken: its lease, and the state head read in the same step."""

    lease: Lease
    head: StateHead


@dataclass(frozen=True)
class Refused:
    """A stream not taken: ``busy`` (``detail``: the holder's lease value) or ``failed``
    (``detail``: why it is parked)."""

    status: Literal["busy", "failed"]
    detail: str


class Claims:
    """Claims and releases streams on a redis-py client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = client.register_script(scripts.BATCH_CLAIM)
        self._release = client.register_script(scripts.BATCH_RELEASE)

    def claim(self, stream_id: str, worker_id: str, lease_s: float,
              flag_ttl_s: float | None) -> Claimed | Refused:
        """Take ``stream_id`` for ``lease_s`` unless it is held or parked.

        ``flag_ttl_s``: refresh the stream's scheduled flag to this (the task's own stream);
        None leaves the flag alone (a stream claimed as another task's companion).
        """
        keys = StreamKeys.of(stream_id)
        check_worker_id(worker_id)
        started = time.monotonic()
        reply = self._claim(
            keys=[keys.lease, keys.fence, keys.meta, keys.state, keys.state_pending,
                  keys.scheduled],
            args=[worker_id, ttl_ms(lease_s), 0 if flag_ttl_s is None else ttl_ms(flag_ttl_s)])
        status = as_text(reply[0])
        if status != "ok":
            return Refused("failed" if status == "failed" else "busy", as_text(reply[1]))
        token, previous, *fields, members = reply[1:]
        lease = Lease(stream_id=keys.stream_id, worker_id=worker_id, token=int(token),
                      ttl_s=lease_s, previous_holder=as_text(previous),
                      valid_until=started + lease_s)
        return Claimed(lease, parse_head(stream_id, fields, members))

    def release(self, lease: Lease, then: Then, flag_ttl_s: float) -> bool:
        """Give ``lease`` back and settle the flag as ``then`` says; True when the flag is set
        for a new task the caller must now enqueue."""
        keys = StreamKeys.of(lease.stream_id)
        lease.valid_until = 0.0
        _, enqueue = self._release(
            keys=[keys.lease, keys.meta, keys.scheduled, keys.input, keys.state],
            args=[lease.value, then, ttl_ms(flag_ttl_s)])
        return int(enqueue) == 1
