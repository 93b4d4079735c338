"""Shared vocabularies: how a batch ended and why a commit was refused.

Workers return them, the state store raises them, metrics label series with them and
operators read them in logs and on dashboards; each is spelled once, here.
"""

from __future__ import annotations

from typing import Literal, get_args

#: How one batch of one stream ended:
#: ``applied`` committed; ``idle`` nothing to read; ``busy`` leased by another worker;
#: ``failed`` the stream is parked (corrupt or foreign state); ``lost`` the lease ran out
#: mid-batch; ``stale`` the commit was refused by the fencing check; ``deferred`` a newer
#: build wrote the stream's state: left for an upgraded worker (``formats``).
BatchStatus = Literal["applied", "idle", "busy", "failed", "lost", "stale", "deferred"]
BATCH_STATUSES: tuple[BatchStatus, ...] = get_args(BatchStatus)

#: Why a fenced commit was refused because the caller no longer owns the stream.
StaleReason = Literal["stale_fence", "lease_lost", "version_conflict"]
STALE_FENCE: StaleReason = "stale_fence"
LEASE_LOST: StaleReason = "lease_lost"
VERSION_CONFLICT: StaleReason = "version_conflict"
STALE_REASONS: tuple[StaleReason, ...] = get_args(StaleReason)
