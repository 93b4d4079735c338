"""WAIT for replicas after a commit, on the connection that ran it (Redis Cluster re-routing).

With ``redis_wait_replicas`` > 0 a commit script is followed, on the same connection, by
``WAIT replicas timeout_ms``. A commit the replicas acknowledged survives a failover to one of
them. Fewer in time (no replica left after a failover, or one lagging) is logged and counted,
not raised: the commit is applied on the primary and cannot be taken back, and if a later
failover does roll it back, the state, its input position, version and input trim roll back
together and the stream is simply replayed from there (the version check still refuses any
double application).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script

from state_store.connection import is_cluster

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 30.0
_ROUTING_ATTEMPTS = 3


class ReplicaWait:
    """Runs a one-slot script, then WAIT, pipelined on one connection to the slot's primary."""

    def __init__(self, client: redis.Redis, replicas: int, timeout_ms: int) -> None:
        self.client = client
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        #: commits that fewer than ``replicas`` replicas acknowledged in time
        self.unreplicated = 0
        self._logged = 0.0

    def run(
        self, script: Script, route_key: str, stream_id: str,
        keys: Sequence[str], args: Sequence[Any],
    ) -> tuple[list[Any], int]:
        """The script's reply and how many replicas acknowledged it.

        WAIT counts the replicas that have every write made *on this connection*, so it must
        follow the script on the same connection: with Redis Cluster that is a connection to
        the primary owning ``route_key``'s slot, not the cluster client's routing. A MOVED/ASK
        reply means the script did not run (the slot moved in a failover): re-read the slot
        map and try again.
        """
        cluster = is_cluster(self.client)
        for _ in range(_ROUTING_ATTEMPTS):
            target: Any = self.client
            if cluster:
                node = self.client.get_node_from_key(route_key)  # type: ignore[attr-defined]
                target = self.client.get_redis_connection(node)  # type: ignore[attr-defined]
            pipe = target.pipeline(transaction=False)
            script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            reply, acked = pipe.execute(raise_on_error=False)
            if cluster and isinstance(reply, (redis.exceptions.MovedError,
                                              redis.exceptions.AskError)):
                self.client.nodes_manager.initialize()  # type: ignore[attr-defined]
                continue
            if isinstance(reply, Exception):
                raise reply
            replicas = 0 if isinstance(acked, Exception) else int(acked)
            if int(reply[0]) == 1 and replicas < self.replicas:
                self._note_unreplicated(stream_id, int(reply[1]), replicas)
            return list(reply), replicas
        raise redis.exceptions.ConnectionError(
            f"stream {stream_id!r}: slot kept moving while committing"
        )

    def _note_unreplicated(self, stream_id: str, version: int, replicas: int) -> None:
        self.unreplicated += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_INTERVAL_S:
            self._logged = now
            log.warning(
                "stream %s: commit v%d acknowledged by %d of %d replicas within %d ms (%d such "
                "commits so far); until replicas catch up a failover can roll commits back "
                "(they are then replayed)", stream_id, version, replicas, self.replicas,
                self.timeout_ms, self.unreplicated,
            )
