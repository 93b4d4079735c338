"""What one gateway process holds: settings, Redis clients, the tokens, the SSE hub, the
Celery app it sends asks with; built once by the app factory, reached by every route."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from producer.keyed import KEYED_PREFIX
from sinkstream.contracts.keys import StreamKeys
from sinkstream.gateway.auth import TokenStore
from sinkstream.gateway.hub import Event, Hub
from sinkstream.gateway.notes import dumps, output_view
from sinkstream.ids import entry_id_ms
from sinkstream.settings import Settings, parse_redis_url
from state_store.connection import redis_from_settings
from state_store.replies import as_text

log = logging.getLogger(__name__)

#: A retried POST with the same Idempotency-Key adds nothing for this long (its record in
#: the stream's producers hash is pruned after that).
IDEMPOTENCY_WINDOW_S = 24 * 3600.0
_PRUNE_EVERY_S = 600.0


@dataclass
class Gateway:
    settings: Settings
    tokens: TokenStore
    client: redis.Redis
    hub: Hub
    started: float = field(default_factory=time.time)
    script_sha: str | None = None
    _celery: Celery | None = None
    _pruned: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings, tokens: TokenStore) -> Gateway:
        client = redis_from_settings(settings, client_name="sinkstream-gateway")
        reader = redis_from_settings(settings, client_name="sinkstream-gateway-sse")
        cluster = parse_redis_url(settings.redis_url).kind == "cluster"
        hub = Hub(reader, lambda stream, raw: build_events(reader, stream, raw),
                  cluster=cluster)
        return cls(settings, tokens, client, hub)

    def celery(self) -> Celery:
        """The Celery app asks are sent with (by task name: no worker code runs here)."""
        with self._lock:
            if self._celery is None:
                from workers.app import create_app

                self._celery = create_app(self.settings, register_tasks=False)
            return self._celery

    def close(self) -> None:
        self.hub.stop()
        self.client.close()
        self.hub.client.close()

    def maybe_prune(self, stream_id: str) -> None:
        """Drop this stream's idempotency records older than the window, at most once per
        ``_PRUNE_EVERY_S`` per stream and process: every keyed POST adds one field to the
        stream's producers hash, which would otherwise grow as long as the stream is fed."""
        now = time.monotonic()
        with self._lock:
            if now - self._pruned.get(stream_id, -_PRUNE_EVERY_S) < _PRUNE_EVERY_S:
                return
            self._pruned[stream_id] = now
        threading.Thread(target=self._prune, args=(stream_id,), daemon=True).start()

    def _prune(self, stream_id: str) -> None:
        key = StreamKeys.of(stream_id).producers
        cutoff_ms = (time.time() - IDEMPOTENCY_WINDOW_S) * 1000
        try:
            old = []
            for name, record in self.client.hscan_iter(key, match=f"{KEYED_PREFIX}*", count=500):
                last_id = as_text(record).partition(" ")[2]
                if last_id and entry_id_ms(last_id) < cutoff_ms:
                    old.append(name)
            for start in range(0, len(old), 500):
                self.client.hdel(key, *old[start:start + 500])
        except redis.RedisError as exc:
            log.debug("pruning idempotency records of %s: %s", stream_id, exc)


def build_events(client: redis.Redis, stream_id: str,
                 raw: list[tuple[str, dict[str, str]]]) -> list[Event]:
    """Output entries -> events, each serialized once whatever the number of followers."""
    out = []
    for entry_id, fields in raw:
        view: dict[str, Any] = output_view(client, stream_id, entry_id, fields)
        out.append(Event(entry_id, view["kind"] or "output", view["request"], dumps(view)))
    return out
