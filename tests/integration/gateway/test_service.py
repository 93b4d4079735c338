"""Status, notes, ask (without a worker), health, metrics and OpenAPI of a real gateway."""

from __future__ import annotations

import httpx
import redis

from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from tests.integration.gateway.server import GatewayProcess, Tokens, bearer


def test_status_and_notes_of_a_stream(gateway: GatewayProcess, tokens: Tokens,
                                      gw_redis: RedisServer) -> None:
    h = bearer(tokens.acme)
    assert httpx.get(gateway.url + "/v1/streams/acme-none", headers=h).status_code == 404
    httpx.post(gateway.url + "/v1/streams/acme-st/entries", headers=h,
               json={"entries": [{"text": "one"}, {"text": "two"}]})
    status = httpx.get(gateway.url + "/v1/streams/acme-st", headers=h).json()
    assert status["stream"] == "acme-st" and status["status"] == "active"
    assert status["lag_entries"] == 2 and status["offset"] is None
    client: redis.Redis = gw_redis.client(decode_responses=True)
    key = StreamKeys.of("acme-st").output
    client.xadd(key, {"kind": "rolling", "text": "first", "covers": "1-0", "tokens_seen": "5",
                      "model": "m", "ts": "1.0"})
    client.xadd(key, {"kind": "answer", "text": "Maya.", "covers": "1-0", "tokens_seen": "5",
                      "model": "m", "ts": "2.0", "request": "r1"})
    last = client.xadd(key, {"kind": "final", "text": "## Decisions\n- Ship (1700000000000-0)",
                             "covers": "1-0", "tokens_seen": "9", "model": "m", "ts": "3.0"})
    notes = httpx.get(gateway.url + "/v1/streams/acme-st/notes", headers=h).json()
    assert notes["last_event_id"] == last
    assert notes["final"]["sections"][0]["items"][0]["citations"] == ["1700000000000-0"]
    assert [r["text"] for r in notes["rolling"]] == ["first"]
    assert notes["answers"][0]["request"] == "r1"


def test_ask_needs_a_committed_state_and_times_out_clearly(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    h = bearer(tokens.acme)
    url = gateway.url + "/v1/streams/acme-ask/ask"
    httpx.post(gateway.url + "/v1/streams/acme-ask/entries", headers=h,
               json={"entries": [{"text": "hi"}]})
    early = httpx.post(url, headers=h, json={"question": "who?"})
    assert early.status_code == 409 and "no committed state" in early.json()["detail"]
    gw_redis.client().hset(StreamKeys.of("acme-ask").state, "version", 1)
    sent = httpx.post(url, headers=h, json={"question": "who?", "wait": False})
    assert sent.status_code == 202 and len(sent.json()["request"]) == 16
    slow = httpx.post(url, headers=h, json={"question": "who?", "timeout": 1}, timeout=10)
    assert slow.status_code == 504 and "is a worker running" in slow.json()["detail"]
    assert httpx.post(url, headers=h, json={"question": ""}).status_code == 422


def test_health_readiness_metrics_and_openapi(gateway: GatewayProcess) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["status"] == "ok"
    metrics = httpx.get(gateway.url + "/metrics").text
    for name in ("sinkstream_gateway_requests_total", "sinkstream_gateway_request_seconds_bucket",
                 "sinkstream_gateway_sse_clients", "sinkstream_gateway_entries_total",
                 "sinkstream_gateway_auth_failures_total", "process_resident_memory_bytes"):
        assert name in metrics, name
    assert "acme-" not in metrics, "no stream ids in metric labels"
    spec = httpx.get(gateway.url + "/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/streams", "/v1/streams/{stream_id}", "/v1/streams/{stream_id}/entries",
                 "/v1/streams/{stream_id}/end", "/v1/streams/{stream_id}/notes",
                 "/v1/streams/{stream_id}/ask", "/v1/streams/{stream_id}/events",
                 "/v1/streams/{stream_id}/captions", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
    idem = [p for p in paths["/v1/streams/{stream_id}/entries"]["post"]["parameters"]
            if p["name"] == "Idempotency-Key"]
    assert idem and idem[0]["in"] == "header"


def test_the_page_is_static_and_locked_down(gateway: GatewayProcess) -> None:
    page = httpx.get(gateway.url + "/streams/acme-page")
    assert page.status_code == 200 and "<script src=\"/static/notes.js\"" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "innerHTML" not in httpx.get(gateway.url + "/static/notes.js").text
    assert httpx.get(gateway.url + "/streams/bad%7Bid").status_code == 404
