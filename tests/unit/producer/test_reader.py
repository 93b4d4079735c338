"""The entry contract against a real private redis-server: a raw ``XADD`` is read by the library
(``producer/reader.py``), and a bad entry is rejected with a reason."""

from __future__ import annotations

import pytest
import redis

from producer.reader import read_entries
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.entries import InputEntry, Rejected, parse_entry
from sinkstream.ids import InvalidStreamId

pytestmark = pytest.mark.usefixtures("quiet_retries")


# --- the entry contract ---------------------------------------------------------------------


def test_raw_xadd_entry_is_read_by_the_library(r: redis.Redis, redis_server: RedisServer) -> None:
    # exactly what `redis-cli XADD 'sinkstream:{standup}:in' '*' text "Alice: ship it friday"` does
    r.execute_command("XADD", "sinkstream:{standup}:in", "*", "text", "Alice: ship it friday")
    r.execute_command("XADD", "sinkstream:{standup}:in", "*", "text", "ok", "speaker", "Bob",
                      "ts", "12.5", "source", "zoom")
    r.execute_command("XADD", "sinkstream:{standup}:in", "*", "text", "", "eos", "1")
    parsed = list(read_entries(r, "standup"))
    assert [(e.text, e.speaker, e.ts, e.eos) for e in parsed if isinstance(e, InputEntry)] == [
        ("Alice: ship it friday", None, None, False),
        ("ok", "Bob", 12.5, False),
        ("", None, None, True),
    ]
    assert all(isinstance(e.id, str) and "-" in e.id for e in parsed)
    # the same through a decode_responses client
    decoded = redis_server.client(decode_responses=True)
    assert [e.text for e in read_entries(decoded, "standup")][:2] == ["Alice: ship it friday", "ok"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"speaker": b"A"}, "missing required field 'text'"),
        ({b"text": b""}, "'text' is empty"),
        ({b"text": b"caf\xe9"}, "'text' is not valid UTF-8 (byte offset 3)"),
        ({b"text": b"x", b"speaker": b"\xff"}, "'speaker' is not valid UTF-8"),
        ({b"text": b"x", b"ts": b"noon"}, "'ts' must be a number"),
        ({b"text": b"x", b"ts": b"nan"}, "'ts' must be finite"),
        ({b"text": b"x", b"eos": b"maybe"}, "'eos' must be '1'"),
    ],
)
def test_bad_entries_are_rejected_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    parsed = parse_entry(b"1-0", fields)
    assert isinstance(parsed, Rejected)
    assert reason in parsed.reason
    assert parsed.id == "1-0" and all(isinstance(v, str) for v in parsed.fields.values())


def test_parse_entry_size_limit_and_lenient_flags() -> None:
    assert isinstance(parse_entry("1-0", {"text": "x" * 100}, max_text_bytes=99), Rejected)
    ok = parse_entry("1-0", {"text": "x", "eos": "0", "ts": "", "speaker": ""})
    assert ok == InputEntry("1-0", "x", None, None, False)


def test_read_entries_pages_and_bounds(r: redis.Redis) -> None:
    for i in range(25):
        r.xadd("sinkstream:{p}:in", {"text": f"t{i}"})
    assert [e.text for e in read_entries(r, "p", page_size=4)] == [f"t{i}" for i in range(25)]  # type: ignore[union-attr]
    assert len(list(read_entries(r, "p", count=7, page_size=3))) == 7
    with pytest.raises(InvalidStreamId):
        list(read_entries(r, "a}:x"))
