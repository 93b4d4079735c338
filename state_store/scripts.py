"""Every Lua script sinkstream runs on Redis, loaded once from ``state_store/lua/*.lua``.

Each ``.lua`` file starts with a comment block documenting its KEYS, ARGV and reply. Every
script touches only keys of one stream (one hash tag) or one global key, so it runs on a single
Redis Cluster slot; keys are always passed in KEYS, never built inside a script.

Callers register a script (``client.register_script(scripts.STATE_COMMIT)``: EVALSHA, loaded
on NOSCRIPT) or, for many streams at once, run it pipelined with :func:`run_script_each`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import redis


def _load(name: str, *fragments: str) -> str:
    """``lua/NAME.lua``, after the ``fragments`` it calls (``lua/FRAGMENT.lua``: local
    functions written once for several scripts)."""
    folder = files(__package__ or "state_store").joinpath("lua")
    return "\n".join(folder.joinpath(f"{part}.lua").read_text("utf-8")
                     for part in (*fragments, name))


#: Idempotent, length-capped append of input entries (producer/publisher.py).
PRODUCER_APPEND = _load("producer_append")
#: The start and end of a batch: lease + flag + head, and release + flag (state_store/claims.py).
BATCH_CLAIM = _load("batch_claim", "lease_take", "unread")
BATCH_RELEASE = _load("batch_release", "unread")
#: Per-stream leases with fencing tokens (state_store/lease.py).
LEASE_ACQUIRE = _load("lease_acquire", "lease_take")
LEASE_RENEW = _load("lease_renew")
LEASE_RELEASE = _load("lease_release")
#: The fenced, exactly-once commit of a batch (state_store/commit.py).
STATE_COMMIT = _load("state_commit")
#: Deletion of staged chunk/segment sets that were never committed (state_store/staging.py).
STATE_CLEANUP = _load("state_cleanup")
#: Dispatcher leadership and the per-stream "needs a task?" check (workers/scheduling/).
DISPATCHER_LEAD = _load("dispatcher_lead")
NEEDS_WORK = _load("needs_work", "unread")
#: Worker heartbeats and the count of live task slots (state_store/presence.py).
WORKER_PRESENCE = _load("worker_presence")
#: Input lag and status of one stream, read-only (monitoring/lag.py).
STREAM_LAG = _load("stream_lag")
#: Embeddings of retrieval chunks, written once beside their chunks (workers/memory/vectors.py).
MEMORY_VECTORS = _load("memory_vectors")


def run_script_each(
    client: redis.Redis, script: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
    command: str = "EVALSHA",
) -> list[Any]:
    """Run ``script`` once per ``(keys, args)`` in ``calls``, pipelined in one round trip
    (per node on a cluster); the replies in order, a failed call's error as its reply.

    Raw EVALSHA, because redis-py's cluster pipeline refuses Script objects and ``.evalsha()``
    but routes a raw EVALSHA by its first key. A server that lacks the script (first use, a
    restart, a promoted replica) answers NOSCRIPT, which means nothing ran: the script is loaded
    (on every primary of a cluster) and the pipeline sent once more. ``command="EVALSHA_RO"``
    runs a read-only script as one (Redis >= 7), so a user with read-only access to its keys
    (``%R~`` in an ACL) may run it."""
    sha = hashlib.sha1(script.encode()).hexdigest()
    replies: list[Any] = []
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command(command, sha, len(keys), *keys, *args)
        replies = pipe.execute(raise_on_error=False)
        if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            client.script_load(script)
            continue
        break
    return replies
