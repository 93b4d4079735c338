"""A stream's logs hash and kind, read with the batch and written only inside its commit.

``sinkstream:{<id>}:logs`` holds the miner (``miner``), the template table (``table``) and
the last entry id they cover (``applied``). They are set by the same fenced commit that sets
the state and its last applied entry, so ``applied`` always equals the state's last entry id
once the stream has logs: a reader that finds them apart knows the state moved under it.
The stream's kind comes from its meta hash (``sinkstream.contracts.kinds``) in the same read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.kinds import META_FIELD as KIND_FIELD
from sinkstream.contracts.kinds import StreamKind, parse_kind
from state_store.replies import as_text
from workers.logs.mining import Miner, MiningConfig
from workers.logs.table import BurstConfig, Table

log = logging.getLogger(__name__)

MINER_FIELD = "miner"
TABLE_FIELD = "table"
APPLIED_FIELD = "applied"
FIELDS = (MINER_FIELD, TABLE_FIELD, APPLIED_FIELD)


@dataclass(frozen=True)
class LogsHead:
    """What a batch starts from: the stream's kind and its committed miner and table bytes
    (decoded only when the batch has log lines)."""

    kind: StreamKind | None = None
    miner: bytes | None = None
    table: bytes | None = None
    applied: str | None = None

    @property
    def has_logs(self) -> bool:
        return self.miner is not None

    def load(self, mining: MiningConfig, bursts: BurstConfig) -> tuple[Miner, Table]:
        """Fresh, decoded copies to mutate (MinerStateError / TableStateError if corrupt)."""
        miner = Miner.decode(self.miner, mining) if self.miner is not None else Miner(mining)
        table = Table.decode(self.table, bursts) if self.table is not None else Table(bursts)
        return miner, table


def request(pipe: redis.client.Pipeline, stream_id: str) -> None:
    """Queue the reads on ``pipe`` (they share the batch's read round trip)."""
    keys = StreamKeys.of(stream_id)
    pipe.hget(keys.meta, KIND_FIELD)
    pipe.hmget(keys.logs, list(FIELDS))


#: replies ``request`` adds to the pipeline
REPLIES = 2


def parse(stream_id: str, replies: Sequence[Any]) -> LogsHead:
    """The head from ``request``'s replies. A kind nobody knows is read as the default (with
    a warning): the kind is a hint for reading, never a reason to stop a stream."""
    raw_kind, (miner, table, applied) = replies
    try:
        kind = parse_kind(raw_kind)
    except ValueError as exc:
        log.warning("stream %s: %s; read as a meeting", stream_id, exc)
        kind = None
    return LogsHead(kind, miner, table, as_text(applied) if applied is not None else None)


def read(client: redis.Redis, stream_id: str) -> LogsHead:
    """The committed head, in one round trip (read only: tools and notes on demand)."""
    pipe = client.pipeline(transaction=False)
    request(pipe, stream_id)
    return parse(stream_id, pipe.execute())
