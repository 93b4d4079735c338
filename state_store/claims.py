"""The beginning and the end of a batch on Redis, one round trip each.

``claim`` takes a stream for a task: it refreshes the stream's scheduled flag, refuses a parked
stream or one with nothing to read (without a lease: the commonest task under cross-stream
batching is a stream's own task finding it fed already as a companion), takes the lease with
a new fencing token and reads the state head the batch starts from and commits against
(``batch_claim.lua``). ``release`` gives the stream back and settles
its scheduled flag: kept for the next task when input is left, dropped when the stream is
caught up, and set again at once when input arrived meanwhile (``batch_release.lua``).

The dispatcher's side of the flag (``SET NX`` before it enqueues a task) stays with
``workers/scheduling``; this is the task's side of the same protocol, folded into the lease
scripts so a batch costs four round trips on a hot state (claim, read, commit, release) where
it cost eleven.

The flag has two lifetimes. Queued (set by the dispatcher, or by ``release`` for the next
task) it lasts ``schedule_ttl_seconds``: a task may wait that long in the broker queue. Running
(from the claim on) it follows the lease: the claim sets it to :func:`running_flag_ttl` and
every lease renewal extends it by as much (``lease_renew.lua``). A worker killed mid-task thus
leaves a flag that lapses :data:`FLAG_MARGIN_S` after its lease, and the dispatcher's next full
pass re-schedules the stream: takeover within ``lease_seconds`` + the margin + one pass, where
it waited for the whole queued-task TTL (120 s).
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
#: arrived meanwhile), ``retry`` (a batch of the task's own stream cut short by an error: the
#: flag gets the queued TTL back, so the dispatcher retries the stream once that lapses, not
#: right after the lease), ``keep`` (leave it: a companion stream)
Then = Literal["continue", "done", "retry", "keep"]

#: A running task's scheduled flag lapses this long after its lease would: the dispatcher
#: re-schedules a dead holder's stream once both are gone, never while the lease still holds.
FLAG_MARGIN_S = 1.0


def running_flag_ttl(lease_s: float) -> float:
    """The scheduled flag's TTL while a task holds the stream: the lease plus the margin."""
    return lease_s + FLAG_MARGIN_S


@dataclass(frozen=True)
class Claimed:
    """A stream taken: its lease, and the state head read in the same step."""

    lease: Lease
    head: StateHead


@dataclass(frozen=True)
class Refused:
    """A stream not taken: ``busy`` (``detail``: the holder's lease value), ``failed``
    (``detail``: why it is parked) or ``idle`` (nothing to read after its committed entry:
    no lease taken, the task's own flag dropped)."""

    status: Literal["busy", "failed", "idle"]
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

        ``flag_ttl_s``: refresh the stream's scheduled flag to this (the task's own stream,
        normally :func:`running_flag_ttl`), and have the lease's renewals extend it by as much;
        None leaves the flag alone (a stream claimed as another task's companion).
        """
        keys = StreamKeys.of(stream_id)
        check_worker_id(worker_id)
        started = time.monotonic()
        reply = self._claim(
            keys=[keys.lease, keys.fence, keys.meta, keys.state, keys.state_pending,
                  keys.scheduled, keys.input],
            args=[worker_id, ttl_ms(lease_s), 0 if flag_ttl_s is None else ttl_ms(flag_ttl_s)])
        status = as_text(reply[0])
        if status == "failed":
            return Refused("failed", as_text(reply[1]))
        if status == "idle":
            return Refused("idle", "")
        if status != "ok":
            return Refused("busy", as_text(reply[1]))
        token, previous, *fields, members = reply[1:]
        lease = Lease(stream_id=keys.stream_id, worker_id=worker_id, token=int(token),
                      ttl_s=lease_s, previous_holder=as_text(previous),
                      valid_until=started + lease_s, flag_ttl_s=flag_ttl_s or 0.0)
        return Claimed(lease, parse_head(stream_id, fields, members))

    def release(self, lease: Lease, then: Then, flag_ttl_s: float) -> bool:
        """Give ``lease`` back and settle the flag as ``then`` says (``flag_ttl_s``: the queued
        TTL, for ``continue``, ``retry`` and input that arrived meanwhile); True when the flag
        is set for a new task the caller must now enqueue."""
        keys = StreamKeys.of(lease.stream_id)
        lease.valid_until = 0.0
        _, enqueue = self._release(
            keys=[keys.lease, keys.meta, keys.scheduled, keys.input, keys.state],
            args=[lease.value, then, ttl_ms(flag_ttl_s)])
        return int(enqueue) == 1
