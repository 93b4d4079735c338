"""Per-stream leases with fencing tokens.

A worker must hold a stream's lease to process it. A lease expires on its own (a crashed or
paused worker frees the stream after ``ttl_s``), so leases alone cannot stop a worker that was
paused past its expiry from writing after another worker took over. Fencing tokens do: every
acquisition INCRs the stream's ``fence`` counter and the new token is part of the lease value;
``StateStore.commit`` refuses a token that is not the current one. The counter is a plain key
that never expires, so tokens keep increasing across worker restarts and (with AOF) Redis
restarts.

``LeaseKeeper`` renews a lease from a background thread during long batches (the thread runs
while the model computes: torch releases the GIL in its kernels) and raises a flag as soon as
it is lost, so the worker can stop early instead of finding out at commit time. Leases are
short (``lease_seconds``, 5 s by default) so that a dead holder's streams move within seconds;
a live holder, however slow its batch, keeps renewing every third of the lease. The keepers of
one ``LeaseManager`` share one thread (``Renewer``): a worker holding a task's streams as
companions holds dozens of leases, most for a few milliseconds, and a thread started and
joined per lease cost more than the renewals it made.

A lease taken for a task's own stream carries ``flag_ttl_s``: each renewal extends the
stream's ``scheduled`` flag with the lease (``lease_renew.lua``), so the flag of a running task
lapses about when its lease does and the dispatcher re-schedules a dead holder's stream then.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from types import TracebackType

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store import scripts
from state_store.replies import as_text


class LeaseLostError(RuntimeError):
    """The lease expired or was taken over; the batch must be abandoned, not committed."""


@dataclass
class Lease:
    """A held lease. ``valid_until`` is a local monotonic estimate, updated by renewals."""

    stream_id: str
    worker_id: str
    token: int
    ttl_s: float
    #: lease value of the previous holder whose lease expired unreleased ('' = none)
    previous_holder: str = ""
    valid_until: float = field(default=0.0)
    #: renewals extend the stream's scheduled flag to this many seconds (0: leave the flag
    #: alone, e.g. a stream held as another task's companion)
    flag_ttl_s: float = 0.0

    @property
    def value(self) -> str:
        return f"{self.worker_id}|{self.token}"

    @property
    def took_over(self) -> bool:
        """True if this acquisition replaced an expired, unreleased lease (a takeover)."""
        return bool(self.previous_holder)

    def remaining_s(self) -> float:
        """Seconds left by the local clock (conservative: counted from before the request)."""
        return self.valid_until - time.monotonic()


class LeaseManager:
    """Acquire, renew and release per-stream leases on a redis-py client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(scripts.LEASE_ACQUIRE)
        self._renew = client.register_script(scripts.LEASE_RENEW)
        self._release = client.register_script(scripts.LEASE_RELEASE)
        #: the thread that renews every ``LeaseKeeper`` of this manager
        self.renewer = Renewer()

    def acquire(self, stream_id: str, worker_id: str, ttl_s: float) -> Lease | None:
        """Take the stream if nobody holds it; None if another lease is live."""
        keys = StreamKeys.of(stream_id)
        check_worker_id(worker_id)
        started = time.monotonic()
        reply = self._acquire(keys=[keys.lease, keys.fence, keys.meta],
                              args=[worker_id, ttl_ms(ttl_s)])
        if int(reply[0]) != 1:
            return None
        return Lease(
            stream_id=keys.stream_id,
            worker_id=worker_id,
            token=int(reply[1]),
            ttl_s=ttl_s,
            previous_holder=as_text(reply[2]),
            valid_until=started + ttl_s,
        )

    def renew(self, lease: Lease) -> bool:
        """Extend the lease by its ttl if it is still ours, and the stream's scheduled flag by
        ``lease.flag_ttl_s`` if it has one and the flag exists; False if the lease was lost
        (the flag is then left alone)."""
        started = time.monotonic()
        keys = StreamKeys.of(lease.stream_id)
        flag_ms = ttl_ms(lease.flag_ttl_s) if lease.flag_ttl_s > 0 else 0
        ok = self._renew(keys=[keys.lease, keys.scheduled],
                         args=[lease.value, ttl_ms(lease.ttl_s), flag_ms])
        if int(ok) == 1:
            lease.valid_until = started + lease.ttl_s
            return True
        lease.valid_until = 0.0
        return False

    def release(self, lease: Lease) -> bool:
        """Give the stream back (no takeover is counted); False if it was no longer ours."""
        keys = StreamKeys.of(lease.stream_id)
        lease.valid_until = 0.0
        return int(self._release(keys=[keys.lease, keys.meta], args=[lease.value])) == 1

    def holder(self, stream_id: str) -> str | None:
        """The live lease value ``worker|token``, or None."""
        raw = self.client.get(StreamKeys.of(stream_id).lease)
        return as_text(raw) or None

    def current_token(self, stream_id: str) -> int:
        """The stream's fence counter: the token of the latest acquisition (0 = never)."""
        raw = self.client.get(StreamKeys.of(stream_id).fence)
        return int(raw) if raw else 0


class LeaseKeeper:
    """Renew a lease every ``ttl/3`` (from the manager's ``Renewer`` thread) while a batch runs.

    ``lost`` is set as soon as a renewal says the lease is gone, or when Redis errors have kept
    it from renewing until the lease's local deadline passed. ``check()`` also trusts the local
    deadline alone, because a renewal can hang in the client's connection retries (redis-py
    retries with backoff for seconds) while the lease runs out. Call ``keeper.check()`` between
    steps of a long batch; the commit's fencing check is the final guard either way.

    Invariant: once ``stop()`` returns, the lease is never renewed again (a renewal in flight
    finishes first), so a release that follows is the last word on the lease.
    """

    def __init__(
        self, manager: LeaseManager, lease: Lease, interval_s: float | None = None
    ) -> None:
        self.manager = manager
        self.lease = lease
        self.interval_s = interval_s if interval_s is not None else lease.ttl_s / 3
        self.lost = threading.Event()
        self.renewals = 0
        self.last_error: BaseException | None = None
        self.stopped = False
        self._renewing = threading.Lock()  # held while a renewal of this lease runs

    def __enter__(self) -> LeaseKeeper:
        self.manager.renewer.keep(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped = True
        with self._renewing:  # wait out a renewal in flight
            pass

    def check(self) -> None:
        """Raise LeaseLostError if the lease is lost or its local deadline has passed."""
        if not self.lost.is_set() and self.lease.remaining_s() <= 0:
            self.lost.set()
        if self.lost.is_set():
            raise LeaseLostError(
                f"stream {self.lease.stream_id!r}: lease {self.lease.value} lost"
            )

    def renew(self) -> bool:
        """One renewal (the ``Renewer`` calls it when due); whether to renew again."""
        with self._renewing:
            if self.stopped:
                return False
            try:
                if not self.manager.renew(self.lease):
                    self.lost.set()
                    return False
                self.renewals += 1
            except redis.RedisError as exc:
                self.last_error = exc
                if self.lease.remaining_s() <= 0:
                    self.lost.set()
                    return False
            return True


class Renewer:
    """One daemon thread renewing each kept lease every ``interval_s``, earliest due first.

    Renewals run one after another: a renewal stuck in connection retries delays the others,
    which is no worse than before in practice (they share the client and its Redis), and each
    keeper's local deadline still flags its lease as lost on time. Started on first use, and
    again in a forked child (a thread does not survive ``fork``).
    """

    #: seconds with no lease to keep after which the thread ends (a manager that held leases
    #: once, e.g. a CLI command's, does not keep an idle thread for the life of the process)
    IDLE_EXIT_S = 30.0

    def __init__(self) -> None:
        self._due: list[tuple[float, int, LeaseKeeper]] = []  # heap of (when, seq, keeper)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        _renewers.add(self)

    def keep(self, keeper: LeaseKeeper) -> None:
        """Renew ``keeper``'s lease from now on, every ``keeper.interval_s``, until it stops."""
        with self._cond:
            self._push(time.monotonic() + keeper.interval_s, keeper)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease-renewer",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _push(self, when: float, keeper: LeaseKeeper) -> None:
        heapq.heappush(self._due, (when, next(self._seq), keeper))

    def _next(self) -> LeaseKeeper | None:
        """Wait for the earliest keeper due that has not stopped, and take it off the heap;
        None (and the thread is done) after ``IDLE_EXIT_S`` with nothing to keep."""
        with self._cond:
            while True:
                while self._due and self._due[0][2].stopped:
                    heapq.heappop(self._due)
                if not self._due:
                    if not self._cond.wait(self.IDLE_EXIT_S) and not self._due:
                        self._thread = None  # the next ``keep`` starts another
                        return None
                    continue
                wait = self._due[0][0] - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._due)[2]
                self._cond.wait(wait)

    def _run(self) -> None:
        while (keeper := self._next()) is not None:
            if keeper.renew():
                with self._cond:
                    self._push(time.monotonic() + keeper.interval_s, keeper)

    def _after_fork(self) -> None:
        """In a forked child: no thread, a fresh lock (the parent's may have been held), and
        none of the parent's leases (the child must never keep them alive)."""
        self._cond = threading.Condition()
        self._thread = None
        self._due = []


_renewers: weakref.WeakSet[Renewer] = weakref.WeakSet()


def _renewers_after_fork() -> None:
    for renewer in list(_renewers):
        renewer._after_fork()


os.register_at_fork(after_in_child=_renewers_after_fork)


def ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError("lease ttl must be positive")
    return max(1, int(ttl_s * 1000))


def check_worker_id(worker_id: str) -> None:
    if not worker_id or not worker_id.isprintable() or len(worker_id) > 256:
        raise ValueError(f"worker id must be 1..256 printable characters, got {worker_id!r}")
