"""Helpers shared by the scale-out tests: streams spread over shards, a publisher that keeps
publishing through a failover and remembers what Redis acknowledged, and a timeline."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.formats import read_file
from producer.publisher import Producer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from tests.integration.pipeline.harness import committed_tensors, reference_tensors, valid_entries


def qmsum_turns(qmsum_dir: Path, n: int) -> list[Any]:
    return read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum")[:n]


def streams_per_shard(client: Any, per_shard: int, prefix: str = "meet") -> list[str]:
    """Stream ids whose keys land ``per_shard`` on each primary of a cluster client."""
    primaries = {n.name for n in client.get_primaries()}
    buckets: dict[str, list[str]] = {name: [] for name in primaries}
    i = 0
    while any(len(b) < per_shard for b in buckets.values()):
        sid = f"{prefix}{i}"
        node = client.get_node_from_key(StreamKeys.of(sid).input).name
        if len(buckets[node]) < per_shard:
            buckets[node].append(sid)
        i += 1
    return sorted(s for b in buckets.values() for s in b)


@dataclass
class BackgroundPublisher:
    """Publishes ``turns`` round-robin to ``streams``, one turn every ``interval_s``, riding
    out outages with the Producer's own retries; records every turn Redis acknowledged."""

    client: Any
    settings: Settings
    streams: Sequence[str]
    turns: Sequence[Any]
    interval_s: float = 0.05
    acked: dict[str, list[str]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> BackgroundPublisher:
        self._thread.start()
        return self

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background publisher did not finish"

    def _run(self) -> None:
        producer = Producer(self.client, settings=self.settings, retry_attempts=12)
        try:
            for turn in self.turns:
                for sid in self.streams:
                    self._publish(producer, sid, turn)
                    self.acked.setdefault(sid, []).append(turn[0])
                time.sleep(self.interval_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def _publish(self, producer: Producer, sid: str, turn: Any) -> None:
        """Publish; on an error that outlived the Producer's retries (e.g. NOREPLICAS while
        a failover is under way) keep flushing: the turn stays pending in the Producer and
        is confirmed exactly once, never duplicated."""
        deadline = time.monotonic() + 60
        try:
            producer.publish_many(sid, [turn])
            return
        except redis.RedisError as exc:
            self.retried.append(f"{type(exc).__name__}: {exc}")
        while True:
            time.sleep(0.2)
            try:
                producer.flush()
                return
            except redis.RedisError as exc:
                self.retried.append(f"{type(exc).__name__}: {exc}")
                if time.monotonic() > deadline:
                    raise


def lost_entries(client: Any, acked: dict[str, list[str]]) -> dict[str, int]:
    """Per stream: acknowledged texts (counted with multiplicity) no longer in the stream."""
    out = {}
    for sid, texts in acked.items():
        present: dict[str, int] = {}
        for _, fields in client.xrange(StreamKeys.of(sid).input):
            text = fields.get(b"text", b"").decode()
            present[text] = present.get(text, 0) + 1
        missing = 0
        for text in texts:
            if present.get(text, 0) > 0:
                present[text] -= 1
            else:
                missing += 1
        out[sid] = missing
    return out


def assert_states_match_reference(client: Any, settings: Settings, streams: Sequence[str]
                                  ) -> None:
    """Each stream's committed state equals feeding its entries to the engine in this
    process. Streams with the same entries (text, speaker) share one reference run."""
    references: dict[tuple[tuple[str, str | None], ...], dict[str, bytes]] = {}
    for sid in streams:
        entries = valid_entries(client, sid)
        key = tuple((e.text, e.speaker) for e in entries)
        if key not in references:
            references[key] = reference_tensors(settings, entries)
        assert committed_tensors(client, sid) == references[key], \
            f"{sid}: state differs from the reference"


def version(client: redis.Redis, sid: str) -> int:
    raw = client.hget(StreamKeys.of(sid).state, "version")
    return int(raw) if raw else 0


def committed_ms(client: Any, sid: str) -> int:
    raw = client.hget(StreamKeys.of(sid).state, "committed_ms")
    return int(raw) if raw else 0


def report(tmp_path: Path, name: str, timeline: dict[str, Any]) -> None:
    """Print the timeline (shown with ``pytest -s`` / in the failure report) and keep it."""
    text = json.dumps(timeline, indent=2, default=str)
    print(f"\n{name} timeline:\n{text}")
    (tmp_path / f"{name}-timeline.json").write_text(text)
    if os.environ.get("SCALEOUT_TIMELINE_DIR"):  # keep them for a report
        out = Path(os.environ["SCALEOUT_TIMELINE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(text)
