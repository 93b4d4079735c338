"""Duplicate delivery of ``sinkstream.process_stream``: the same message several times (what the
Redis broker does when it redelivers an unacknowledged task after its visibility timeout) plus
extra tasks for the same stream, while another worker holds the stream's lease mid-batch.

Fencing and the version check make every duplicate a no-op: the final state is bit-identical
to the uninterrupted run and no commit is refused (nobody even tried to commit twice).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from tests.integration.chaos.common import (
    Reference,
    all_caught_up,
    busy_outcomes,
    chaos_env,
    chaos_seed,
    make_workload,
    publish,
    settings_for,
    verify,
)
from tests.integration.pipeline.harness import WorkerPool, meta, wait_ready, wait_until, worker_env
from workers.app import create_app

DUPLICATES = 6


def test_duplicate_task_delivery_applies_nothing_twice(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = chaos_env(worker_env(redis_server.url, tmp_path))
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    settings = settings_for(env)
    workload = make_workload(chaos_seed(), "dup", streams=1, turns=40)
    (stream,) = workload.streams
    marker = tmp_path / "holding"
    try:
        # gate the stream (its scheduled flag is set, so no dispatcher enqueues it) and publish
        client.set(StreamKeys.of(stream).scheduled, "1", px=600_000)
        publish(Producer(client, settings=settings), workload)
        # the slow worker pauses 1.5 s after feeding its first batch, lease held
        slow = pool.start("slow", SINKSTREAM_FAULT_POINT="after_feed",
                          SINKSTREAM_FAULT_SLEEP="1.5", SINKSTREAM_FAULT_MARKER=str(marker))
        fast = pool.start("fast")
        wait_ready(pool, [slow, fast])
        app = create_app(settings)
        task_id = str(uuid.uuid4())
        for i in range(DUPLICATES):
            # the same message again and again (a redelivery), and fresh tasks in between
            app.send_task("sinkstream.process_stream", args=[stream], queue=settings.broker_queue,
                          task_id=task_id if i % 2 == 0 else None)
        wait_until(lambda: all_caught_up(client, [stream]), 120, "the stream to catch up",
                   pool.logs)
        assert slow.proc.poll() is None and fast.proc.poll() is None
        busy = busy_outcomes(slow) + busy_outcomes(fast)
    finally:
        pool.close()
    print(f"{DUPLICATES} duplicate tasks: {busy} busy outcomes")
    verdict = verify(client, Reference(settings), workload)
    assert verdict.ok, verdict.describe()
    assert int(meta(client, stream).get("commits_refused", 0)) == 0
    # duplicates that found the lease taken stepped aside without re-enqueueing each other
    # (before the fix: hundreds of busy tasks per second for as long as the holder's batch ran)
    assert busy <= 4 * DUPLICATES, f"{busy} busy outcomes: duplicates spin\n{pool.logs()}"
