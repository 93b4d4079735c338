"""Publishing keyed by an idempotency key: the same key and the same turns add nothing twice.

An HTTP client that retries a POST after a timeout does not know whether the first attempt
landed. :class:`KeyedProducer` maps the request's key onto the producer's own dedup: its
producer id is derived from the key, and its numbering always starts at 1 (a plain Producer
with a caller-chosen id resumes after what Redis recorded, which is right for a long-lived
process and wrong for a retried request). So a retry sends the same ``(producer id, seq)``
pairs, and ``producer_append.lua`` skips every entry the first attempt appended: no
duplicates, and a half-applied first attempt is completed, not repeated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis

from producer.encoding import EncodedEntry
from producer.publisher import Producer, PublishResult, attempts_for
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings

_BATCH_BYTES = 1 << 20

#: prefix of every keyed producer id in ``sinkstream:{<id>}:producers``
KEYED_PREFIX = "key-"


def keyed_producer_id(namespace: str, key: str) -> str:
    """A stable producer id for ``key`` within ``namespace`` (e.g. the caller's token id),
    so two callers choosing the same key never dedup each other's entries."""
    digest = hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()
    return KEYED_PREFIX + digest[:32]


class KeyedProducer(Producer):
    """A one-request producer: id from the idempotency key, numbering from 1.

    ``retry_seconds`` bounds how long one call rides out an unreachable Redis (a request
    handler should fail fast and let its client retry with the same key).
    """

    def __init__(self, client: redis.Redis, settings: Settings, namespace: str, key: str,
                 *, retry_seconds: float = 5.0, script_sha: str | None = None) -> None:
        super().__init__(client, settings=settings,
                         producer_id=keyed_producer_id(namespace, key), on_full="fail",
                         retry_attempts=attempts_for(retry_seconds))
        # the script is loaded once per process, not once per request
        self._sha = script_sha

    @property
    def script_sha(self) -> str | None:
        """The append script's sha once loaded, to hand to the next request's producer."""
        return self._sha

    def _first_seq(self, stream_id: str) -> int:
        """Always 1: a retry must number its entries exactly as the first attempt did."""
        return 1

    def publish_encoded(self, stream: str, entries: Sequence[EncodedEntry], *,
                        eos: bool = False) -> PublishResult:
        """Append entries already validated and encoded (``producer.encoding.encode_turn``),
        then the end marker if ``eos``: for a caller that validates a whole request before
        writing any of it, so each entry is encoded once. Sent ``batch_entries`` (or about
        1 MiB) per script call, like :meth:`publish_many`."""
        keys = StreamKeys.of(stream)
        result = PublishResult()
        with self._lock:
            numbered = self._number(keys.stream_id, list(entries))
            if eos:
                numbered.extend(self._number(keys.stream_id, [(b"", b"", "")], eos="1"))
            start = size = 0
            for end, entry in enumerate(numbered, start=1):
                size += len(entry[1][1])
                if end - start >= self.batch_entries or size >= _BATCH_BYTES:
                    self._send(keys, numbered[start:end], result)
                    start, size = end, 0
            if start < len(numbered) or not numbered:
                self._send(keys, numbered[start:], result)
        return result
