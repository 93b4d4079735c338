"""A producer process for the chaos tests: publishes a workload slowly, riding out outages.

``python -m tests.integration.chaos.producer_proc SPEC.json`` where the spec holds ``turns``
(stream -> [[text, speaker], ...]), ``pause_s`` between slices, ``batch`` turns per slice and
``attempts`` (the Producer's retry attempts per call). A call that still fails after its
attempts keeps its entries pending in the Producer; this loop then waits and calls ``flush()``,
as an application would, so a long outage loses nothing and duplicates nothing. Logs go to
stderr (one WARNING per failed attempt, from ``state_store.connection.retry_call``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import redis

from producer.publisher import Producer
from sinkstream.settings import load_settings

log = logging.getLogger("chaos.producer")


def main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    turns: dict[str, list[list[str]]] = spec["turns"]
    producer = Producer(settings=load_settings(), retry_attempts=int(spec["attempts"]))
    batch = int(spec["batch"])
    longest = max(len(rows) for rows in turns.values())
    for start in range(0, longest, batch):
        for sid, rows in turns.items():
            part = rows[start : start + batch]
            if not part:
                continue
            try:
                producer.publish_many(sid, [(t, s, None) for t, s in part])
            except redis.RedisError as exc:
                # the entries stay pending in the Producer (numbered once): flush them later
                log.warning("publish to %s gave up for now (%s); flushing later", sid, exc)
                _flush_until_done(producer)
        time.sleep(float(spec["pause_s"]))
    producer.close()
    log.info("published everything")
    return 0


def _flush_until_done(producer: Producer) -> None:
    while True:
        time.sleep(1.0)
        try:
            producer.flush()
            return
        except redis.RedisError:
            continue


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
