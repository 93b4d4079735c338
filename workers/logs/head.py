"""A stream's logs hash and kind, read with the batch and written only inside its commit.

``sinkstream:{<id>}:logs`` holds the miner (``miner:*`` fields, ``workers.logs.mining``), the
template table (``table:*``, ``workers.logs.table``) and the last entry id they cover
(``applied``). They are set by the same fenced commit that sets the state and its last applied
entry, so ``applied`` always equals the state's last entry id once the stream has logs: a
reader that finds them apart knows the state moved under it. The stream's kind comes from its
meta hash (``sinkstream.contracts.kinds``) in the same read.

A batch reads only the small fields (``applied`` and the two heads): a worker that committed
the stream's last batch still holds its miner and table (``LogFolder.remember``); any other
reads the whole hash once (``read_fields``). A stream written in the first format (``miner``
and ``table`` blobs) is read from those, and its next commit replaces them by the fields.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.kinds import META_FIELD as KIND_FIELD
from sinkstream.contracts.kinds import StreamKind, parse_kind
from state_store.replies import as_text
from workers.logs import mining, table
from workers.logs.mining import Miner, MiningConfig
from workers.logs.table import BurstConfig, Table

log = logging.getLogger(__name__)

APPLIED_FIELD = "applied"
#: the first format's fields: the whole miner and the whole table, one blob each
LEGACY_FIELDS = ("miner", "table")
#: what a batch reads of the hash
_HEAD_FIELDS = (APPLIED_FIELD, mining.HEAD_FIELD, table.HEAD_FIELD, *LEGACY_FIELDS)


@dataclass(frozen=True)
class LogsHead:
    """What a batch starts from: the stream's kind, the last entry its logs cover, and the
    heads of its committed miner and table (``fields``: the whole hash, once read)."""

    kind: StreamKind | None = None
    applied: str | None = None
    miner: bytes | None = None
    table: bytes | None = None
    #: the first format's (miner, table) blobs, for a stream not committed since
    legacy: tuple[bytes, bytes] | None = None
    fields: Mapping[str, bytes] | None = None

    @property
    def has_logs(self) -> bool:
        return self.miner is not None or self.legacy is not None

    @property
    def complete(self) -> bool:
        """Whether ``load`` can decode without reading the rest of the hash."""
        return not self.has_logs or self.legacy is not None or self.fields is not None

    def load(self, mining: MiningConfig, bursts: BurstConfig) -> tuple[Miner, Table]:
        """Fresh, decoded copies to mutate (MinerStateError / TableStateError if corrupt).
        Needs ``complete``: the fields read whole (``read_fields``) or the first format."""
        if self.legacy is not None:
            return Miner.decode(self.legacy[0], mining), Table.decode(self.legacy[1], bursts)
        if not self.has_logs:
            return Miner(mining), Table(bursts)
        if self.fields is None:
            raise ValueError("the logs hash was not read whole (read_fields)")
        return Miner.from_fields(self.fields, mining), Table.from_fields(self.fields, bursts)


def request(pipe: redis.client.Pipeline, stream_id: str) -> None:
    """Queue the reads on ``pipe`` (they share the batch's read round trip)."""
    keys = StreamKeys.of(stream_id)
    pipe.hget(keys.meta, KIND_FIELD)
    pipe.hmget(keys.logs, list(_HEAD_FIELDS))


#: replies ``request`` adds to the pipeline
REPLIES = 2


def parse(stream_id: str, replies: Sequence[Any]) -> LogsHead:
    """The head from ``request``'s replies. A kind nobody knows is read as the default (with
    a warning): the kind is a hint for reading, never a reason to stop a stream."""
    raw_kind, (applied, miner, table_head, legacy_miner, legacy_table) = replies
    try:
        kind = parse_kind(raw_kind)
    except ValueError as exc:
        log.warning("stream %s: %s; read as a meeting", stream_id, exc)
        kind = None
    return _head(kind, applied, miner, table_head, legacy_miner, legacy_table)


def _head(kind: StreamKind | None, applied: Any, miner: bytes | None, table_head: bytes | None,
          legacy_miner: bytes | None, legacy_table: bytes | None,
          fields: Mapping[str, bytes] | None = None) -> LogsHead:
    legacy = None
    if miner is None and legacy_miner is not None:
        legacy = (legacy_miner, legacy_table or b"")
    return LogsHead(kind, as_text(applied) if applied is not None else None, miner,
                    table_head, legacy, fields)


def with_fields(kind: StreamKind | None, raw: Mapping[Any, Any]) -> LogsHead:
    """The head of a logs hash read whole (``HGETALL``'s reply)."""
    fields = {as_text(k): bytes(v) for k, v in raw.items()}
    return _head(kind, fields.get(APPLIED_FIELD), fields.get(mining.HEAD_FIELD),
                 fields.get(table.HEAD_FIELD), fields.get(LEGACY_FIELDS[0]),
                 fields.get(LEGACY_FIELDS[1]), fields)


def read_fields(client: redis.Redis, stream_id: str, head: LogsHead) -> LogsHead:
    """The head again with the whole logs hash, ready to ``load`` (one more round trip)."""
    return with_fields(head.kind, client.hgetall(StreamKeys.of(stream_id).logs))


def read(client: redis.Redis, stream_id: str) -> LogsHead:
    """The committed head with the whole hash, ready to ``load`` (read only: tools and notes
    on demand)."""
    keys = StreamKeys.of(stream_id)
    pipe = client.pipeline(transaction=False)
    request(pipe, stream_id)
    pipe.hgetall(keys.logs)
    *replies, raw = pipe.execute()
    return with_fields(parse(stream_id, replies).kind, raw)
