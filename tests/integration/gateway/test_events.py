"""SSE against a real gateway: events as they are committed, resumable by Last-Event-ID,
heartbeats, and one Redis reader per gateway process whatever the number of followers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outputs import SummaryKind, make_output
from tests.integration.gateway.server import GatewayProcess, Tokens, bearer
from tests.integration.gateway.sse import read_events

NOTES = ("## Summary\nThe team agreed to ship on the fourteenth.\n\n"
         "## Decisions\n- Ship on the fourteenth (1700000000000-1)\n\n"
         "## Key moments\n- Maya: We ship on the fourteenth. (1700000000000-1)")


def _commit(server: RedisServer, stream: str, text: str, kind: SummaryKind = SummaryKind.ROLLING
            ) -> str:
    """What a worker's commit appends to the output stream."""
    client: redis.Redis = server.client(decode_responses=True)
    entry = make_output(kind, text, "1700000000000-1", 42, "tiny")
    return str(client.xadd(StreamKeys.of(stream).output, entry.fields()))  # type: ignore[arg-type]


def _later(seconds: float, fn: object, *args: object) -> threading.Timer:
    timer = threading.Timer(seconds, fn, args)  # type: ignore[arg-type]
    timer.start()
    return timer


def test_events_arrive_as_committed_and_resume_after_last_event_id(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    stream, url = "acme-live", f"{gateway.url}/v1/streams/acme-live/events"
    first = _commit(gw_redis, stream, "before anyone followed")
    _later(0.5, _commit, gw_redis, stream, "rolling one")
    _later(0.8, _commit, gw_redis, stream, NOTES, SummaryKind.FINAL)
    live = read_events(url, bearer(tokens.acme), count=2)
    assert [e["event"] for e in live.events] == ["rolling", "final"]
    assert live.events[0]["data"]["text"] == "rolling one"
    final = live.events[1]["data"]
    assert [s["title"] for s in final["sections"]] == ["Summary", "Decisions", "Key moments"]
    assert final["sections"][1]["items"][0]["text"] == "Ship on the fourteenth"
    assert final["citations"]["1700000000000-1"]["quote"] == "We ship on the fourteenth."
    # a reconnect with Last-Event-ID gets exactly what came after it
    resumed = read_events(url, {**bearer(tokens.acme), "Last-Event-ID": first}, count=2)
    assert [e["id"] for e in resumed.events] == [e["id"] for e in live.events]
    everything = read_events(url + "?after=0", bearer(tokens.acme), count=3)
    assert everything.events[0]["id"] == first
    bad = httpx.get(url, headers={**bearer(tokens.acme), "Last-Event-ID": "yesterday"})
    assert bad.status_code == 422


def test_heartbeats_keep_a_quiet_stream_open(gateway: GatewayProcess, tokens: Tokens) -> None:
    got = read_events(f"{gateway.url}/v1/streams/acme-quiet/events", bearer(tokens.acme),
                      count=0, comments=2, timeout=5)
    assert got.comments >= 2


def _xread_connections(server: RedisServer) -> int:
    clients = server.client(decode_responses=True).client_list()
    return sum(1 for c in clients if c.get("cmd") == "xread")


def test_one_reader_fans_out_to_every_follower(gateway: GatewayProcess, tokens: Tokens,
                                               gw_redis: RedisServer) -> None:
    followers, streams = 24, ["acme-fan-a", "acme-fan-b", "acme-fan-c"]
    with ThreadPoolExecutor(followers) as pool:
        futures = [pool.submit(read_events, f"{gateway.url}/v1/streams/{streams[i % 3]}/events",
                               bearer(tokens.acme), 3, 20.0) for i in range(followers)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready = httpx.get(gateway.url + "/readyz").json()
            if ready["sse_clients"] >= followers:
                break
            time.sleep(0.1)
        assert _xread_connections(gw_redis) == 1, "one blocked XREAD for all followers"
        ids = {s: [_commit(gw_redis, s, f"{s} {n}") for n in range(3)] for s in streams}
        results = [f.result() for f in futures]
    for i, got in enumerate(results):
        assert [e["id"] for e in got.events] == ids[streams[i % 3]]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "sinkstream_gateway_sse_clients" in metrics
    assert 'sinkstream_gateway_requests_total{method="GET",' \
           'route="/v1/streams/{stream_id}/events",status="200"}' in metrics


def test_no_follower_misses_an_event_across_a_gateway_restart(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    stream, url = "acme-restart", f"{gateway.url}/v1/streams/acme-restart/events"
    _later(0.5, _commit, gw_redis, stream, "one")
    before = read_events(url, bearer(tokens.acme), count=1)
    gateway.kill()
    during = [_commit(gw_redis, stream, f"while down {n}") for n in range(3)]
    gateway.start()
    after = read_events(url, {**bearer(tokens.acme), "Last-Event-ID": before.events[-1]["id"]},
                        count=3)
    assert [e["id"] for e in after.events] == during
