"""The gateway in front of a Redis Cluster: publishing, status and notes route by each
stream's hash tag, and SSE followers of streams on different shards all get their events
(one reader per followed stream there: one XREAD cannot span hash slots)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from sinkstream.cli.localredis import LocalCluster, RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outputs import SummaryKind, make_output
from tests.integration.gateway.server import GatewayProcess, Tokens, bearer, gateway_env
from tests.integration.gateway.sse import Received, read_events


def test_gateway_on_a_cluster(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", masters=3, replicas=0).start()
    broker = RedisServer(tmp_path / "broker").start()  # Celery cannot use a cluster
    tokens = Tokens.create(tmp_path / "tokens.json")
    env = gateway_env(cluster.url, tokens.path, SINKSTREAM_BROKER_URL=broker.url)
    gateway = GatewayProcess(env, tmp_path / "gateway.log")
    streams = [f"acme-shard-{i}" for i in range(6)]
    try:
        gateway.start()
        h = bearer(tokens.acme)
        data = cluster.client(decode_responses=True)
        slots = {data.keyslot(StreamKeys.of(s).input) for s in streams}
        assert len(slots) > 1
        for stream in streams:
            reply = httpx.post(f"{gateway.url}/v1/streams/{stream}/entries", headers=h,
                               json={"entries": [{"text": f"hello {stream}"}]})
            assert reply.status_code == 200, reply.text + gateway.tail()
            assert httpx.get(f"{gateway.url}/v1/streams/{stream}", headers=h
                             ).json()["lag_entries"] == 1
        results: dict[str, Received] = {}

        def follow(stream: str) -> None:
            results[stream] = read_events(f"{gateway.url}/v1/streams/{stream}/events", h,
                                          count=2, timeout=20)

        threads = [threading.Thread(target=follow, args=(s,)) for s in streams]
        for thread in threads:
            thread.start()
        assert _wait_clients(gateway, len(streams)), gateway.tail()
        committed = {s: [data.xadd(StreamKeys.of(s).output,
                                   make_output(SummaryKind.ROLLING, f"{s} {n}", "1-0", 1,
                                               "m").fields())  # type: ignore[arg-type]
                         for n in range(2)] for s in streams}
        for thread in threads:
            thread.join(30)
        for stream in streams:
            assert [e["id"] for e in results[stream].events] == committed[stream]
        notes = httpx.get(f"{gateway.url}/v1/streams/{streams[0]}/notes", headers=h).json()
        assert notes["last_event_id"] == committed[streams[0]][-1]
        listed = {s["stream"] for s in httpx.get(f"{gateway.url}/v1/streams", headers=h
                                                 ).json()["streams"]}
        assert set(streams) <= listed
    finally:
        gateway.stop()
        broker.stop(hard=True)
        cluster.stop()


def _wait_clients(gateway: GatewayProcess, count: int) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if httpx.get(gateway.url + "/readyz").json().get("sse_clients", 0) >= count:
            return True
        time.sleep(0.1)
    return False
