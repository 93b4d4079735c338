"""Log lines of every shape read as records: message, level, time, logger."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest

from sinkstream.contracts.entries import InputEntry, Rejected, parse_entry
from workers.logs import parse
from workers.logs.parse import level_of, parse_line, time_of

REF = dt.datetime(2024, 3, 5, 12, 0, tzinfo=dt.timezone.utc).timestamp()


def test_json_lines_take_common_key_names() -> None:
    rec = parse_line('{"ts": "2024-03-05T10:00:01.5Z", "level": "WARNING", '
                     '"logger": "db.pool", "msg": "pool exhausted after 30s"}', REF)
    assert (rec.message, rec.level, rec.logger, rec.shape) == (
        "pool exhausted after 30s", "warn", "db.pool", "json")
    assert rec.ts == dt.datetime(2024, 3, 5, 10, 0, 1, 500000, tzinfo=dt.timezone.utc
                                 ).timestamp()
    ecs = parse_line('{"@timestamp": 1709632801000, "log": {"level": "error"}, '
                     '"message": "boom"}', REF)
    assert (ecs.level, ecs.ts, ecs.message) == ("error", 1709632801.0, "boom")
    bunyan = parse_line('{"time": 1709632801, "level": 50, "name": "api", "msg": "x"}')
    assert (bunyan.level, bunyan.logger) == ("fatal", "api")


def test_syslog_5424_and_3164() -> None:
    rec = parse_line("<34>1 2024-03-05T11:59:00Z host sshd 123 ID47 - Failed password", REF)
    assert (rec.level, rec.logger, rec.message, rec.shape) == (
        "fatal", "sshd", "Failed password", "syslog")
    assert rec.ts == REF - 60
    old = parse_line("<28>Mar  5 11:58:00 node-1 kernel[0]: disk /dev/sda almost full", REF)
    assert (old.level, old.logger, old.message) == ("warn", "kernel",
                                                    "disk /dev/sda almost full")
    assert old.ts == REF - 120
    bare = parse_line("Jun 14 15:16:01 combo sshd(pam_unix)[19939]: authentication failure",
                      REF)
    assert bare.shape == "syslog" and bare.logger == "sshd(pam_unix)"
    # a December line read in early January belongs to the year before
    jan = dt.datetime(2024, 1, 1, 0, 5, tzinfo=dt.timezone.utc).timestamp()
    assert parse_line("Dec 31 23:59:00 h app: x", jan).ts == jan - 360


def test_plain_lines_find_time_and_level_words() -> None:
    rec = parse_line("2024-03-05 11:00:00,250 ERROR [main] Connection refused", REF)
    assert (rec.level, rec.message) == ("error", "[main] Connection refused")
    assert rec.ts == REF - 3600 + 0.25
    hdfs = parse_line("081109 203615 148 INFO dfs.DataNode$PacketResponder: Received block")
    assert (hdfs.level, hdfs.message) == ("info", "dfs.DataNode$PacketResponder: Received block")
    prose = parse_line("an error occurred while reading", REF)
    assert (prose.level, prose.message, prose.ts) == (None, "an error occurred while reading",
                                                      REF)
    assert parse_line("[warn] low memory").level == "warn"


def test_plain_lines_take_the_common_log4j_hdfs_and_apache_times() -> None:
    hdfs = parse_line("081109 203615 148 INFO dfs.DataNode$PacketResponder: Received block", REF)
    assert hdfs.ts == dt.datetime(2008, 11, 9, 20, 36, 15, tzinfo=dt.timezone.utc).timestamp()
    assert (hdfs.level, hdfs.message) == ("info", "dfs.DataNode$PacketResponder: Received block")
    spark = parse_line("17/06/09 20:10:40 INFO executor.Executor: Running task 0.0", REF)
    assert spark.ts == dt.datetime(2017, 6, 9, 20, 10, 40, tzinfo=dt.timezone.utc).timestamp()
    assert (spark.level, spark.message) == ("info", "executor.Executor: Running task 0.0")
    apache = parse_line("[Sun Dec 04 04:47:44 2005] [error] mod_jk child workerEnv in error "
                        "state 6", REF)
    assert apache.ts == dt.datetime(2005, 12, 4, 4, 47, 44, tzinfo=dt.timezone.utc).timestamp()
    assert apache.level == "error"
    # digits that are no date are the line's own words, and its time is the entry's
    odd = parse_line("123456 999999 rows copied", REF)
    assert (odd.ts, odd.message) == (REF, "123456 999999 rows copied")


def test_levels_and_times_from_odd_values() -> None:
    assert [level_of(v) for v in ("E", "err", "[CRIT]", 3, 20, True, None)] == [
        None, "error", "fatal", "error", "info", None, None]
    assert time_of("not a time") is None and time_of(float("nan")) is None
    assert time_of(1_700_000_000_123_456) == 1_700_000_000.123456


def test_entries_carry_a_kind() -> None:
    entry = parse_entry("1-0", {b"text": b"x", b"kind": b"log"})
    assert isinstance(entry, InputEntry) and entry.kind == "log"
    assert parse_entry("1-0", {"text": "x"}).kind is None  # type: ignore[union-attr]
    bad = parse_entry("1-0", {"text": "x", "kind": "audio"})
    assert isinstance(bad, Rejected) and "kind" in bad.reason


def test_a_stream_kind_nobody_knows_is_read_as_a_meeting() -> None:
    from workers.logs.head import parse

    assert parse("s", [b"log", [None] * 5]).kind == "log"
    odd = parse("s", [b"audio", [b"1-0", b"m", b"t", None, None]])
    assert odd.kind is None and odd.has_logs and odd.applied == "1-0"


def _first_key(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The reference: the first of ``keys`` present, else the first dotted one one level down."""
    for key in keys:
        if key in data:
            return data[key]
    for key in keys:
        head, _, tail = key.partition(".")
        inner = data.get(head)
        if tail and isinstance(inner, dict) and tail in inner:
            return inner[tail]
    return None


def test_each_key_name_belongs_to_one_field() -> None:
    names = [k for keys in parse._FIELD_KEYS for k in keys]
    assert len(names) == len(set(names))


def test_fields_in_one_pass_are_the_first_keys_present() -> None:
    rng = random.Random(7)
    names = [k for keys in parse._FIELD_KEYS for k in keys] + ["other", "log", "x.y"]
    for _ in range(3000):
        data: dict[str, Any] = {}
        for name in rng.sample(names, rng.randint(0, 6)):
            data[name] = rng.choice([name + "-v", 3, None, {"level": "warn", "logger": "a"}])
        assert parse._fields(data) == [_first_key(data, keys) for keys in parse._FIELD_KEYS]


@pytest.mark.parametrize("text", [b"plain line", "caf\u00e9 \u2603".encode(), b"", b"\xff\xfe",
                                  b"x" * 64, b"x" * 65, b" "])
def test_a_text_only_entry_parses_as_the_field_loop_does(text: bytes) -> None:
    fast = parse_entry(b"1-0", {b"text": text}, max_text_bytes=64)
    # an ignored field takes the field loop
    looped = parse_entry(b"1-0", {b"text": text, b"other": b"1"}, max_text_bytes=64)
    if isinstance(looped, Rejected):
        assert isinstance(fast, Rejected) and fast.reason == looped.reason
    else:
        assert fast == looped
