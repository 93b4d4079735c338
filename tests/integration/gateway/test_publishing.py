"""POST entries, captions and end against a real gateway process and a real redis-server:
idempotent retries, limits with clear statuses, the producer's splitting and validation."""

from __future__ import annotations

import json

import httpx
import redis

from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from tests.integration.gateway.server import GatewayProcess, Tokens, bearer


def _entries(server: RedisServer, stream: str) -> list[dict[str, str]]:
    client: redis.Redis = server.client(decode_responses=True)
    return [fields for _, fields in client.xrange(StreamKeys.of(stream).input)]


def test_a_retried_post_with_the_same_key_adds_nothing(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    body = {"entries": [{"text": "Alice: ship it friday", "speaker": "Alice", "ts": 1.5},
                        {"text": "no speaker", "kind": "meeting"}]}
    headers = {**bearer(tokens.acme), "Idempotency-Key": "batch-1"}
    url = f"{gateway.url}/v1/streams/acme-retry/entries"
    first = httpx.post(url, json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json()["added"] == 2
    for _ in range(3):  # the client never saw the reply, and retries
        again = httpx.post(url, json=body, headers=headers)
        assert again.json() == {**first.json(), "added": 0, "duplicates": 2}
    # a new key is a new batch; the same key from another token is another batch too
    assert httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "batch-2"}
                      ).json()["added"] == 2
    assert httpx.post(url, json=body, headers={**bearer(tokens.admin),
                                               "Idempotency-Key": "batch-1"}
                      ).json()["added"] == 2
    texts = [e["text"] for e in _entries(gw_redis, "acme-retry")]
    assert texts == ["Alice: ship it friday", "no speaker"] * 3
    assert _entries(gw_redis, "acme-retry")[0] == {"text": "Alice: ship it friday",
                                                   "speaker": "Alice", "ts": "1.5"}


def test_a_retry_completes_a_half_applied_batch(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    """The first attempt landed only its first entry (the stream filled up): the retry with
    the same key appends the rest, nothing twice."""
    url = f"{gateway.url}/v1/streams/acme-half/entries"
    headers = {**bearer(tokens.acme), "Idempotency-Key": "k"}
    one = {"entries": [{"text": "first"}]}
    assert httpx.post(url, json=one, headers=headers).json()["added"] == 1
    three = {"entries": [{"text": "first"}, {"text": "second"}, {"text": "third"}]}
    reply = httpx.post(url, json=three, headers=headers).json()
    assert (reply["added"], reply["duplicates"]) == (2, 1)
    assert [e["text"] for e in _entries(gw_redis, "acme-half")] == ["first", "second", "third"]


def test_long_texts_are_split_like_the_producer_splits_them(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    text = " ".join(["word"] * 600)  # 2,999 bytes, max_entry_bytes 1024 here
    reply = httpx.post(f"{gateway.url}/v1/streams/acme-split/entries", headers=bearer(tokens.acme),
                       json={"entries": [{"text": text, "speaker": "Bo"}]})
    assert reply.status_code == 200 and reply.json()["entries"] == 3
    stored = _entries(gw_redis, "acme-split")
    assert "".join(e["text"] for e in stored) == text
    assert all(len(e["text"].encode()) + 2 <= 1024 for e in stored)


def test_limits_and_validation_have_clear_statuses(gateway: GatewayProcess,
                                                   tokens: Tokens) -> None:
    url = f"{gateway.url}/v1/streams/acme-limits/entries"
    h = bearer(tokens.acme)
    big = httpx.post(url, headers=h, json={"entries": [{"text": "x" * 70_000}]})
    assert big.status_code == 413 and "65536 bytes" in big.json()["detail"]
    many = httpx.post(url, headers=h, json={"entries": [{"text": "x"}] * 101})
    assert many.status_code == 413 and "limit of 100" in many.json()["detail"]
    chunked = httpx.post(url, headers={**h, "Content-Type": "application/json"},
                         content=iter([b'{"entries": [', b'{"text": "' + b"y" * 70_000 + b'"}]}']))
    assert chunked.status_code == 413
    cases = [
        ({"entries": [{"text": ""}]}, "entries[0]: text is empty"),
        ({"entries": [{"text": "ok"}, {"text": "a", "speaker": "s" * 300}]}, "entries[1]: speaker"),
        ({"entries": [{"txt": "a"}]}, "body.entries.0.text: Field required"),
        ({"entries": [{"text": "a", "lang": "en"}]}, "body.entries.0.lang: Extra inputs"),
        ({"entries": [{"text": "a", "ts": "NaN"}]}, "finite number"),
        ({"entries": [{"text": "a", "ts": "soon"}]}, "body.entries.0.ts"),
        ({"entries": [{"text": "a", "kind": "audio"}]}, "body.entries.0.kind"),
        ({"entries": []}, "nothing to publish"),
    ]
    for body, message in cases:
        reply = httpx.post(url, headers=h, json=body)
        assert reply.status_code == 422, (body, reply.text)
        assert message in reply.json()["detail"], reply.json()
    assert httpx.post(url, headers=h, content=b"{not json",
                      ).status_code == 422
    bad_id = httpx.post(f"{gateway.url}/v1/streams/acme-bad%7Bid%7D/entries", headers=h,
                        json={"entries": [{"text": "a"}]})
    assert bad_id.status_code in (403, 422), bad_id.text
    nothing_landed = httpx.get(f"{gateway.url}/v1/streams/acme-limits", headers=h)
    assert nothing_landed.status_code == 404, "a refused batch must write nothing"


def test_captions_webhook_accepts_cue_chunks(gateway: GatewayProcess, tokens: Tokens,
                                             gw_redis: RedisServer) -> None:
    url = f"{gateway.url}/v1/streams/acme-captions/captions"
    h = {**bearer(tokens.acme), "Content-Type": "text/vtt"}
    chunk1 = ("WEBVTT\n\n00:00:01.000 --> 00:00:03.500\n<v Maya>Morning everyone.\n\n"
              "00:00:04.000 --> 00:00:06.000\n<v Tomas>Crash first.\n")
    chunk2 = "00:01:02.250 --> 00:01:04.000\n<v Priya>How many users\ndoes it hit?\n"
    assert httpx.post(url, headers={**h, "Idempotency-Key": "c1"}, content=chunk1
                      ).json()["added"] == 2
    assert httpx.post(url, headers={**h, "Idempotency-Key": "c1"}, content=chunk1
                      ).json()["added"] == 0
    assert httpx.post(url + "?end=true", headers={**h, "Idempotency-Key": "c2"},
                      content=chunk2).json()["added"] == 2
    stored = _entries(gw_redis, "acme-captions")
    assert stored[0] == {"text": "Morning everyone.", "speaker": "Maya", "ts": "1.0"}
    assert stored[2] == {"text": "How many users does it hit?", "speaker": "Priya",
                         "ts": "62.25"}
    assert stored[3].get("eos") == "1"
    assert httpx.post(url, headers={**h, "Content-Type": "application/json"},
                      content="{}").status_code == 415
    assert httpx.post(url, headers=h, content="00:00:01.000 --> nonsense\nhi"
                      ).status_code == 422


def test_end_is_idempotent_without_a_key(gateway: GatewayProcess, tokens: Tokens,
                                         gw_redis: RedisServer) -> None:
    base = f"{gateway.url}/v1/streams/acme-end"
    h = bearer(tokens.acme)
    httpx.post(base + "/entries", headers=h, json={"entries": [{"text": "hello"}]})
    assert httpx.post(base + "/end", headers=h).json()["added"] == 1
    assert httpx.post(base + "/end", headers=h).json()["added"] == 0
    stored = _entries(gw_redis, "acme-end")
    assert [e.get("eos") for e in stored] == [None, "1"]
    listed = httpx.get(f"{gateway.url}/v1/streams", headers=h).json()["streams"]
    assert {"stream": "acme-end", "ended": True} == {
        k: v for s in listed if s["stream"] == "acme-end" for k, v in s.items()
        if k in ("stream", "ended")}


def test_idempotency_records_are_per_key_producer_ids(gw_redis: RedisServer,
                                                      gateway: GatewayProcess,
                                                      tokens: Tokens) -> None:
    """The key becomes a producer id (hashed with the token id): the dedup record is the
    producer's own, in the stream's producers hash."""
    httpx.post(f"{gateway.url}/v1/streams/acme-rec/entries", json={"entries": [{"text": "a"}]},
               headers={**bearer(tokens.acme), "Idempotency-Key": "secret-ish key"})
    client: redis.Redis = gw_redis.client(decode_responses=True)
    records = client.hgetall(StreamKeys.of("acme-rec").producers)
    assert len(records) == 1
    (pid, record), = records.items()
    assert pid.startswith("key-") and "secret" not in pid
    assert record.startswith("1 ")
    assert json.dumps(records).count("secret") == 0


def test_entries_of_kind_log_make_a_log_stream(
        gateway: GatewayProcess, tokens: Tokens, gw_redis: RedisServer) -> None:
    url = f"{gateway.url}/v1/streams/acme-logs/entries"
    body = {"entries": [{"text": "ERROR disk full on /dev/sda1", "kind": "log"}]}
    reply = httpx.post(url, json=body, headers=bearer(tokens.acme))
    assert reply.status_code == 200, reply.text
    client: redis.Redis = gw_redis.client(decode_responses=True)
    assert client.hget(StreamKeys.of("acme-logs").meta, "kind") == "log"
    mixed = {"entries": [{"text": "a", "kind": "log"}, {"text": "b", "kind": "meeting"}]}
    refused = httpx.post(url, json=mixed, headers=bearer(tokens.acme))
    assert refused.status_code == 422 and "one kind" in refused.text
