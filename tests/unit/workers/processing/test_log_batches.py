"""Log streams through the real batch steps: lines mined and counted exactly once, the miner
and table committed with the state, identical however the stream is cut or resumed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from tests.unit.workers.logs.first_format import miner_blob, table_blob
from workers.engines.base import Engine
from workers.logs import head as logs_head
from workers.logs.mining import Miner
from workers.logs.retention import FIELD as RETENTION_FIELD
from workers.logs.table import Table
from workers.processing.hot_cache import HotStateCache
from workers.processing.processor import StreamProcessor

BASE: dict[str, Any] = {
    "model": "tiny-llama", "recent_tokens": 48, "sink_tokens": 4, "chunk_tokens": 16,
    "summary_every_tokens": 0, "metrics_port": 0, "retrieval": "off",
}

LINES = [
    f'{{"ts": 1700000000.5, "level": "INFO", "msg": "Receiving block blk_{i} src: '
    f'/10.0.0.{i % 7}:5000"}}' if i % 5 else
    f'{{"ts": 1700000001, "level": "ERROR", "msg": "DataXceiver error on blk_{i}: timed out '
    f'after {10 * i}ms"}}'
    for i in range(1, 41)
] + [f"2023-11-14T22:20:00Z WARN disk /data/{i} is 9{i}% full" for i in range(5)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine[Any]]:
    from workers.engines.loading import load_engine

    yield load_engine(Settings(**BASE, model_cache_dir=tmp_path_factory.mktemp("models")))


def _processor(engine: Engine[Any], server: RedisServer, batch: int) -> StreamProcessor:
    settings = Settings(**BASE, redis_url=server.url, max_batch_entries=batch)
    return StreamProcessor(engine, redis_from_settings(settings), settings, f"w{batch}",
                           cache=HotStateCache(1 << 30))


def _drain(proc: StreamProcessor, stream: str, batches: int | None = None) -> None:
    done = 0
    while batches is None or done < batches:
        outcome = proc.process(stream)
        done += 1
        if outcome.status == "idle" or not outcome.more and outcome.status == "applied" \
                and batches is None:
            break


def _publish(server: RedisServer, stream: str) -> None:
    """The stream's kind set as the producer sets it, and the lines XADDed under fixed entry
    ids (as a raw client may), so two streams of the same lines can be compared byte for
    byte."""
    producer = Producer(server.client(), settings=Settings(**BASE, redis_url=server.url))
    producer.set_kind(stream, "log")
    client = server.client()
    for index, line in enumerate(LINES):
        client.xadd(StreamKeys.of(stream).input, {"text": line}, id=f"1700000000000-{index + 1}")


def test_lines_are_mined_counted_and_committed_with_the_state(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    _publish(redis_server, "app-logs")
    proc = _processor(engine, redis_server, batch=8)
    _drain(proc, "app-logs")
    client = redis_server.client()
    head = logs_head.read(client, "app-logs")
    state: dict[bytes, bytes] = client.hgetall(StreamKeys.of("app-logs").state)  # type: ignore[assignment]
    assert head.kind == "log" and head.applied == state[b"last_entry_id"].decode()
    miner, table = head.load(proc.logs.mining, proc.logs.bursts)
    assert table.lines == len(LINES)
    assert table.levels == {"info": 32, "error": 8, "warn": 5}
    counts = sorted((s.count, s.level, s.template) for s in table.templates.values())
    assert counts == [
        (5, "warn", "disk <PATH> is <NUM> full"),
        (8, "error", "DataXceiver error on <BLK>: timed out after <DUR>"),
        (32, "info", "Receiving block <BLK> src: /<IP>"),
    ]
    # only the lines that created a template were fed: three short lines, not 45 (the tiny
    # model's tokenizer is byte-level: the raw lines would be a token per byte)
    assert 0 < int(state[b"tokens_seen"]) < sum(len(line) for line in LINES) // 10
    assert isinstance(miner, Miner) and isinstance(table, Table)


def _straight(engine: Engine[Any], server: RedisServer) -> dict[bytes, bytes]:
    """The logs hash of every line worked in one batch: what any cut must commit."""
    _publish(server, "straight")
    _drain(_processor(engine, server, batch=45), "straight")
    return server.client().hgetall(StreamKeys.of("straight").logs)  # type: ignore[return-value]


def test_any_cut_and_any_resume_give_identical_bytes(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    straight = _straight(engine, redis_server)
    _publish(redis_server, "resumed")
    _drain(_processor(engine, redis_server, batch=3), "resumed", batches=4)
    # another worker, cold, picks the stream up where the commits left it
    _drain(_processor(engine, redis_server, batch=7), "resumed")
    resumed = redis_server.client().hgetall(StreamKeys.of("resumed").logs)
    assert straight == resumed and b"miner:head" in straight


def test_a_stream_mined_in_the_first_format_continues_and_is_rewritten_as_fields(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    client = redis_server.client()
    straight = _straight(engine, redis_server)
    _publish(redis_server, "old")
    _drain(_processor(engine, redis_server, batch=9), "old", batches=2)
    # what a worker of the first format would have left: the same miner and table, as blobs
    key = StreamKeys.of("old").logs
    head = logs_head.read(client, "old")
    miner, table = head.load(Miner().config, Table().config)
    assert head.applied is not None
    client.delete(key)
    client.hset(key, mapping={"miner": miner_blob(miner), "table": table_blob(table),
                              "applied": head.applied})
    _drain(_processor(engine, redis_server, batch=9), "old")  # a worker of this format
    # the same miner and table; the input marks (``keep``) of a stream from before them
    # start with its next mark, so they are compared apart
    assert _without_marks(client.hgetall(key)) == _without_marks(straight)


def _without_marks(fields: Any) -> dict[bytes, bytes]:
    return {k: v for k, v in fields.items() if k != RETENTION_FIELD.encode()}


def test_a_corrupt_miner_parks_the_stream_with_a_reason(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    _publish(redis_server, "broken")
    proc = _processor(engine, redis_server, batch=8)
    proc.process("broken")
    client = redis_server.client()
    client.hset(StreamKeys.of("broken").logs, "miner:head", b"\x93not a miner")
    outcome = proc.process("broken")
    assert outcome.status == "failed" and "logs unreadable" in outcome.reason


def test_a_corrupt_template_field_parks_the_stream_on_a_worker_that_reads_it(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    _publish(redis_server, "broken")
    _processor(engine, redis_server, batch=8).process("broken")
    client = redis_server.client()
    client.hset(StreamKeys.of("broken").logs, "table:t:1", b"\x93not a row")
    outcome = _processor(engine, redis_server, batch=9).process("broken")  # a cold worker
    assert outcome.status == "failed" and "logs unreadable" in outcome.reason


def test_cli_publishes_a_log_file_and_prints_its_template_table(
        engine: Engine[Any], redis_server: RedisServer, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from sinkstream.cli import common as cli_common
    from sinkstream.cli.app import app

    monkeypatch.setenv("SINKSTREAM_REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SINKSTREAM_CONFIG", raising=False)
    monkeypatch.setattr(cli_common.state, "settings", None)
    monkeypatch.setattr(cli_common.state, "config", None)
    runner = CliRunner()
    app_log = tmp_path / "app.jsonl"  # a .jsonl suffix: still one log line per entry
    app_log.write_text("\n".join(LINES) + "\n")
    published = runner.invoke(app, ["publish", "tail", str(app_log), "--kind", "log"])
    assert published.exit_code == 0, published.output
    empty = runner.invoke(app, ["logs", "tail"])
    assert empty.exit_code != 0 and "no log lines yet" in empty.output
    _drain(_processor(engine, redis_server, batch=64), "tail")
    table = runner.invoke(app, ["logs", "tail", "--problems"])
    assert table.exit_code == 0, table.output
    assert "DataXceiver error on <BLK>" in table.output and "Receiving" not in table.output
    rows = runner.invoke(app, ["logs", "tail", "--json"])
    assert [json.loads(line)["count"] for line in rows.output.splitlines()] == [32, 8, 5]
    errors = json.loads(rows.output.splitlines()[1])["id"]
    # the latest lines of one template, from those the stream keeps
    latest = runner.invoke(app, ["logs", "tail", "--lines", f"T{errors}", "-n", "3"])
    assert latest.exit_code == 0, latest.output
    assert [line.split("DataXceiver error on ")[1].split(":")[0]
            for line in latest.output.splitlines()] == ["blk_30", "blk_35", "blk_40"]
    assert all("[ERROR]" in line and "(entry " in line for line in latest.output.splitlines())
    unknown = runner.invoke(app, ["logs", "tail", "--lines", "T99"])
    assert unknown.exit_code != 0 and "no template 'T99'" in unknown.output


def _log_batch(lines: list[str], start: int) -> Any:
    from sinkstream.contracts.entries import InputEntry
    from workers.processing.batches import Batch

    entries = [InputEntry(f"1700000000000-{start + i}", line) for i, line in enumerate(lines)]
    return Batch(entries, [], [], entries[-1].id, False, False, counts=[0] * len(entries))


def test_a_remembered_miner_and_table_fold_as_decoded_ones() -> None:
    from sinkstream.contracts.kinds import LOG
    from workers.processing.log_batches import LogFolder

    def fold_all(folder: LogFolder, remember: bool) -> list[dict[str, bytes | str]]:
        stored: dict[str, bytes] = {}
        head, out = logs_head.LogsHead(LOG), []
        for start in range(0, len(LINES), 7):
            _, update = folder.fold("s", head, _log_batch(LINES[start:start + 7], start))
            assert update is not None
            if remember:
                folder.remember("s", update, update.fields)
            out.append(update.fields)
            stored.update({k: v.encode() if isinstance(v, str) else v
                           for k, v in update.fields.items()})
            head = logs_head.with_fields(LOG, stored)
            if remember:  # what a batch reads: the heads only, not the whole hash
                head = logs_head.LogsHead(LOG, head.applied, head.miner, head.table)
        return out

    warm = LogFolder(None, feed="none")  # type: ignore[arg-type]  # feeds nothing
    assert fold_all(warm, True) == fold_all(LogFolder(None, warm=0, feed="none"),  # type: ignore[arg-type]
                                            False)
    assert len(warm._warm) == 1  # each batch took the last one's objects and left its own


def _committed_head(update: Any) -> Any:
    from sinkstream.contracts.kinds import LOG

    return logs_head.LogsHead(LOG, str(update.fields["applied"]), update.fields["miner:head"],
                              update.fields["table:head"])


def test_only_the_stream_and_heads_committed_find_remembered_objects() -> None:
    from sinkstream.contracts.kinds import LOG
    from workers.processing.log_batches import LogFolder

    folder = LogFolder(None, feed="none", warm=2)  # type: ignore[arg-type]
    _, update = folder.fold("s", logs_head.LogsHead(LOG), _log_batch(LINES[:5], 0))
    assert update is not None
    folder.remember("s", update, update.fields)
    head = _committed_head(update)
    assert folder.holds("s", head) and not folder.holds("t", head)
    assert folder._load("s", head)[0] is update.miner
    assert not folder.holds("s", head)  # handed out once, then read and decoded
    folder.remember("s", update, {k: v for k, v in update.fields.items()
                                  if k != "table:head"})  # no table committed: nothing kept
    assert not folder._warm


def test_remembered_pairs_are_bounded_by_their_templates() -> None:
    from sinkstream.contracts.kinds import LOG
    from workers.processing.log_batches import LogFolder

    folder = LogFolder(None, feed="none")  # type: ignore[arg-type]
    updates = []
    for start in range(0, 21, 7):  # three streams' first batches: three different pairs
        _, update = folder.fold(f"s{start}", logs_head.LogsHead(LOG),
                                _log_batch(LINES[start:start + 7], 0))
        assert update is not None
        updates.append((f"s{start}", update))
    sizes = [len(u.table.templates) for _, u in updates]
    folder.warm_templates = sizes[1] + sizes[2]
    for stream, update in updates:
        folder.remember(stream, update, update.fields)
    assert len(folder._warm) == 2 and folder._warm_count == sizes[1] + sizes[2]  # oldest out
    folder.warm_templates = min(sizes) - 1  # a pair over the bound is not kept at all
    folder.remember(*updates[0], updates[0][1].fields)
    assert len(folder._warm) == 2


# ----- the lines a log stream keeps (workers.logs.retention) ----------------------------------


def _keeping(engine: Engine[Any], server: RedisServer, batch: int,
             keep: int) -> StreamProcessor:
    settings = Settings(**BASE, redis_url=server.url, max_batch_entries=batch,
                        log_keep_lines=keep)
    return StreamProcessor(engine, redis_from_settings(settings), settings, f"k{batch}",
                           cache=HotStateCache(1 << 30))


def _input_ids(server: RedisServer, stream: str) -> list[str]:
    raw: Any = server.client().xrange(StreamKeys.of(stream).input)
    return [entry_id.decode() for entry_id, _ in raw]


def test_a_log_stream_keeps_its_last_lines_however_it_is_cut(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    """32 lines kept (marks every 2nd line): 32 or 33 of the 45 stay, the newest, and the
    logs hash is the same bytes for any cut into batches."""
    _publish(redis_server, "whole")
    _drain(_keeping(engine, redis_server, batch=45, keep=32), "whole")
    _publish(redis_server, "cut")
    _drain(_keeping(engine, redis_server, batch=3, keep=32), "cut", batches=5)
    _drain(_keeping(engine, redis_server, batch=7, keep=32), "cut")  # another worker, cold
    client = redis_server.client()
    assert client.hgetall(StreamKeys.of("whole").logs) == \
        client.hgetall(StreamKeys.of("cut").logs)
    published = [f"1700000000000-{i + 1}" for i in range(len(LINES))]
    for stream in ("whole", "cut"):
        kept = _input_ids(redis_server, stream)
        assert 32 <= len(kept) <= 33 and kept == published[-len(kept):]


def test_kept_lines_are_not_listed_as_waiting(
        engine: Engine[Any], redis_server: RedisServer, runner: Any) -> None:
    from sinkstream.cli import app as cli

    _publish(redis_server, "tail")
    _drain(_keeping(engine, redis_server, batch=45, keep=32), "tail")
    Producer(redis_server.client(), settings=Settings(**BASE, redis_url=redis_server.url)) \
        .publish("tail", "one more")  # registered as any producer's stream
    listed = runner.invoke(cli.app, ["streams"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "tail" in line)
    assert row.split("│")[2].strip() == "1"  # waiting: the new line, not the 32+ kept


def test_a_stream_keeping_nothing_is_trimmed_to_what_is_unapplied(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    _publish(redis_server, "bare")
    proc = _keeping(engine, redis_server, batch=8, keep=0)
    _drain(proc, "bare")
    assert _input_ids(redis_server, "bare") == []
    assert RETENTION_FIELD.encode() not in redis_server.client().hgetall(
        StreamKeys.of("bare").logs)


def test_ask_quotes_the_kept_lines_that_name_what_it_asks_about(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    _publish(redis_server, "asked")
    proc = _keeping(engine, redis_server, batch=8, keep=32)
    _drain(proc, "asked")
    answer = proc.answers.answer("asked", "what happened to blk_35?")
    assert "Lines:\n" in answer.text
    assert "[ERROR] DataXceiver error on blk_35: timed out after 350ms " \
           "(entry 1700000000000-35)" in answer.text
    assert "blk_36" not in answer.text  # a line must name what is asked about
    facts = answer.text.split("Lines:")[0]  # the template of that line, not all with "blk"
    assert "`DataXceiver error on <BLK>: timed out after <DUR>`" in facts
    assert "Receiving block" not in facts
    assert [s.entries for s in answer.sources if s.entries[0] == s.entries[1]] == \
        [("1700000000000-35", "1700000000000-35")]
    gone = proc.answers.answer("asked", "what happened to blk_2?")  # trimmed: not kept
    assert "Lines:" not in gone.text and "blk_2 " not in gone.text
