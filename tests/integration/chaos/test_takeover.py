"""Failover with the default settings (issue 22), real workers and a real redis-server:
a slow live batch keeps its lease however long it takes; ``kill -9`` of the lease holder moves
the stream to the other worker within the lease (not after the queued-task TTL); streams
written by a bare ``XADD`` are found within a second; nothing is lost or applied twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from tests.integration.chaos.common import chaos_seed, make_workload, publish
from tests.integration.chaos.failover import default_env, holder_kills
from tests.integration.pipeline.harness import (
    WorkerPool,
    caught_up,
    committed_tensors,
    meta,
    reference_tensors,
    settings_from_env,
    valid_entries,
    wait_ready,
    wait_until,
)

LEASE_S = 5.0  # the default


def test_a_slow_batch_keeps_its_lease_and_a_killed_holder_is_replaced_within_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = default_env(redis_server.url, tmp_path)
    settings = settings_from_env(env)
    assert settings.lease_seconds == LEASE_S
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    marker = tmp_path / "fault"
    sid = "slow-000"  # make_workload's name for the stream
    keys = StreamKeys.of(sid)
    try:
        workload = make_workload(chaos_seed(), "slow", 1, turns=40)
        assert workload.streams == [sid]
        publish(Producer(client, settings=settings), workload)
        # the holder stalls mid-batch (fed, not committed) far longer than its lease
        holder = pool.start("holder", SINKSTREAM_FAULT_POINT="after_feed",
                            SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 120, "the holder to stall mid-batch", pool.logs)
        held = client.get(keys.lease)
        assert held is not None
        other = pool.start("other")
        wait_ready(pool, [other])
        time.sleep(2 * LEASE_S)  # the other worker is idle and leads or polls meanwhile
        assert client.get(keys.lease) == held  # renewed all along: no takeover of a live one
        assert int(meta(client, sid).get("leases_taken_over", 0)) == 0
        os.kill(holder.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: client.hget(keys.state, "fence") not in (None, held.split(b"|")[-1]),
                   30, "another worker to commit the stream", pool.logs)
        takeover = time.monotonic() - killed
        wait_until(lambda: caught_up(client, sid), 60, "the stream to finish",
                   pool.logs)
    finally:
        pool.close()
    assert takeover <= 10.0, takeover
    assert int(meta(client, sid)["leases_taken_over"]) == 1
    reference = reference_tensors(settings, valid_entries(client, sid))
    assert committed_tensors(client, sid) == reference


def test_killing_the_lease_holder_twice_and_raw_xadd_streams(tmp_path: Path) -> None:
    report = holder_kills(tmp_path, seed=chaos_seed(), trials=2, raw_streams=2,
                          takeover_timeout_s=30.0)
    assert report.verdict.ok, report.verdict.describe()
    assert report.trials == 2
    assert report.notes["takeover_seconds_max"] <= 10.0, report.notes
    assert report.notes["discovery_seconds_max"] <= 1.0, report.notes
