"""Finding raw-XADD streams within a second: Redis keyspace notifications for new input keys.

A producer registers its streams and wakes the dispatcher; a foreign client (``redis-cli
XADD``) does neither, and used to wait for the dispatcher's discovery SCAN (every
``discover_interval_seconds``, 10 s). Redis can instead tell us the moment a key is created:
with ``notify-keyspace-events`` holding ``K`` (keyspace channels) and ``n`` (new-key events,
Redis >= 7.0), creating ``sinkstream:{<id>}:in`` publishes ``new`` on
``__keyspace@<db>__:sinkstream:{<id>}:in``. The leading dispatcher PSUBSCRIBEs that one pattern:
Redis matches it server-side, so the dispatcher hears of each new input stream once (not of
every entry, and not of the state, lease or output keys), and no loop polls any stream. The
server's cost: with ``Kn`` it builds one keyspace channel name per *created* key (leases and
flags are created per batch) and matches it against the pattern subscriptions; nothing is
sent unless it matches.

Invariants:

* The SCAN stays the fallback and the safety net: it still runs every
  ``discover_interval_seconds``, so a server that refuses ``CONFIG`` (ACL users, managed
  Redis), an older Redis without ``n``, a Redis Cluster (notifications are per node) or an
  event lost during a reconnect only make discovery slower, never miss a stream.
* Existing server flags are kept: ``K`` and ``n`` are added to whatever is configured.
* ``keyspace_events = "auto"`` tries ``CONFIG SET`` only where it can be allowed: not on a
  cluster, and not when connected as a named ACL user (a refused command lands in the ``ACL
  LOG``; least-privilege deployments set ``notify-keyspace-events Kn`` in redis.conf and use
  ``listen``). ``listen`` subscribes without touching the configuration; ``off`` neither.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import redis

from sinkstream.contracts.keys import PREFIX
from sinkstream.ids import InvalidStreamId, validate_stream_id
from state_store.connection import is_cluster
from state_store.replies import as_text

log = logging.getLogger(__name__)

Mode = Literal["auto", "listen", "off"]

#: the flags sinkstream needs in ``notify-keyspace-events``: keyspace channels, new-key events
NEEDED_FLAGS = "Kn"
#: the event Redis publishes on a key's keyspace channel when the key is created
NEW_KEY_EVENT = "new"
_INPUT_PREFIX = f"{PREFIX}:{{"
_INPUT_SUFFIX = "}:in"
#: the fallback is logged once per process, not once per leadership term or reconnect
_told_unavailable = False


def channel_pattern(db: int) -> str:
    """The PSUBSCRIBE pattern for new input streams in database ``db``."""
    return f"__keyspace@{db}__:{_INPUT_PREFIX}*{_INPUT_SUFFIX}"


def client_db(client: redis.Redis) -> int:
    """The database the client's commands go to (0 unless the URL selects another)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    return int(kwargs.get("db", 0) or 0)


def stream_of(channel: bytes | str, event: bytes | str) -> str | None:
    """The stream id of a ``new`` event on an input key's keyspace channel; None for any
    other event, key or an invalid id (anyone can create keys: never trust the name)."""
    if as_text(event, errors="replace") != NEW_KEY_EVENT:
        return None
    text = as_text(channel, errors="replace")
    start = text.find(_INPUT_PREFIX, text.find("__:") + 3)
    if start < 0 or not text.endswith(_INPUT_SUFFIX):
        return None
    try:
        return validate_stream_id(text[start + len(_INPUT_PREFIX) : -len(_INPUT_SUFFIX)])
    except InvalidStreamId:
        return None


def may_configure(client: redis.Redis, mode: Mode) -> bool:
    """Whether ``mode`` lets this client try ``CONFIG``: ``auto`` on a single Redis (or a
    Sentinel master) reached as the default user."""
    if mode != "auto" or is_cluster(client):
        return False
    kwargs: Any = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    return kwargs.get("username") in (None, "", "default")


def enable(client: redis.Redis, mode: Mode) -> bool:
    """Make sure the server publishes new-key events for input streams, if ``mode`` allows.

    Returns True when they are known to be on (already configured, or set now); False when
    they could not be checked or set (the caller keeps the SCAN as the only discovery)."""
    global _told_unavailable
    if not may_configure(client, mode):
        return False
    try:
        reply: Any = client.config_get("notify-keyspace-events")
        current = as_text(reply.get("notify-keyspace-events", ""))
        missing = "".join(flag for flag in NEEDED_FLAGS if flag not in current)
        if missing:
            client.config_set("notify-keyspace-events", current + missing)
        return True
    except redis.ResponseError as exc:  # CONFIG refused or renamed, or no 'n' (Redis < 7)
        if _told_unavailable:
            return False
        _told_unavailable = True
        log.info("dispatcher: keyspace notifications unavailable (%s); raw XADD streams are "
                 "found by the discovery scan (set notify-keyspace-events %s on the server "
                 "to find them at once)", exc, NEEDED_FLAGS)
        return False
