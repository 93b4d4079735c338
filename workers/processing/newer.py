"""Streams a newer build has written, as one worker meets them.

A state (or log miner, or template table) in a format version past what this build reads is
an upgraded worker's work (``sinkstream.contracts.formats``): the stream is left for one
(``deferred``), not parked. Tried again every ``DEFER_RETRY_S`` by whichever worker takes it,
an old worker would read the whole state each time (tens of MB for a real model's window,
for every such stream, in a fleet rolled back past a format change); so each worker
remembers the state version it met and, while the stream's committed version stays there,
defers it from the head alone. Another version means someone committed since: read again.
The first meeting is also marked on the stream (``mark``, the store's ``mark_deferred``), so
``sinkstream status`` shows which streams wait for an upgraded worker, and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from state_store.connection import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

#: how soon a stream a newer build wrote is tried again (by any worker: during a rolling
#: upgrade, soon an upgraded one), at most ``schedule_ttl_seconds``
DEFER_RETRY_S = 15.0


class NewerStreams:
    """Stream id -> (state version, reason) for the streams this worker deferred; at most
    ``limit`` (the oldest met is forgotten first: it is only read once more)."""

    def __init__(self, limit: int,
                 mark: Callable[[str, int, str], None] | None = None) -> None:
        self.limit = max(1, limit)
        self._mark = mark
        self._met: dict[str, tuple[int, str]] = {}

    def known(self, stream_id: str, version: int) -> str | None:
        """Why the stream was deferred, if its committed state is still at ``version``."""
        met = self._met.get(stream_id)
        return met[1] if met is not None and met[0] == version else None

    def met(self, stream_id: str, version: int, reason: str) -> None:
        """Remember a deferral (logged and marked once per stream and state version; a mark
        that Redis refuses now is only logged: the stream is deferred all the same)."""
        if self.known(stream_id, version) is None:
            log.warning("%s; left for an upgraded worker", reason)
            if self._mark is not None:
                try:
                    self._mark(stream_id, version, reason)
                except TRANSIENT_ERRORS as exc:
                    log.debug("stream %s: deferral not marked (%s)", stream_id, exc)
            self._met.pop(stream_id, None)
            if len(self._met) >= self.limit:
                del self._met[next(iter(self._met))]
            self._met[stream_id] = (version, reason)
