"""The producer's CLI against a real private redis-server: ``sinkstream publish`` from files,
stdin and followed files, ``sinkstream streams``, and user errors that say what is wrong
without a traceback."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from producer.formats import Turn, read_file
from sinkstream.cli import app as cli
from sinkstream.cli.localredis import RedisServer, free_port
from tests.unit.producer.conftest import SAMPLES, entries, turns_of
from tests.unit.producer.test_formats import VTT_TURNS

pytestmark = pytest.mark.usefixtures("quiet_retries")


# --- CLI -----------------------------------------------------------------------------------------


def _ok(result: Any) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def _user_error(result: Any, *needles: str) -> str:
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code != 0
    assert "Traceback" not in text
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, text
    return flat


def test_cli_publishes_a_vtt_file(runner: CliRunner, redis_server: RedisServer) -> None:
    result = runner.invoke(cli.app, ["publish", "talk", str(SAMPLES / "standup.vtt")])
    _ok(result)
    assert "published 7 entries" in result.output
    got = entries(redis_server, "talk")
    assert turns_of(got) == VTT_TURNS and got[-1].eos


def test_cli_publishes_qmsum_and_lists_streams(
    runner: CliRunner, redis_server: RedisServer, qmsum_dir: Path
) -> None:
    path = sorted(qmsum_dir.glob("*.json"))[0]
    _ok(runner.invoke(cli.app, ["publish", "meeting", str(path), "--format", "qmsum",
                                "--no-eos"]))
    _ok(runner.invoke(cli.app, ["publish", "other", "-"], input="hello\n"))
    got = entries(redis_server, "meeting")
    assert not got[-1].eos and len(got) == len(read_file(path, "qmsum"))
    listed = runner.invoke(cli.app, ["streams"])
    _ok(listed)
    assert "meeting" in listed.output and "other" in listed.output
    assert f"{len(got):,}" in listed.output and "yes" in listed.output  # 'other' ended


def test_cli_streams_when_empty(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["streams"])
    _ok(result)
    assert "no streams yet" in result.output


def test_cli_stdin_streams_lines(runner: CliRunner, redis_server: RedisServer) -> None:
    result = runner.invoke(cli.app, ["publish", "pipe"],
                           input="Alice: hi there\n\nplain line\nBob: last, no newline")
    _ok(result)
    assert turns_of(entries(redis_server, "pipe")) == [
        Turn("hi there", "Alice"), Turn("plain line"), Turn("last, no newline", "Bob")]


def test_cli_realtime_speed(runner: CliRunner, redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "ts": i * 0.5}) + "\n" for i in range(3)))
    started = time.monotonic()
    _ok(runner.invoke(cli.app, ["publish", "rt", str(path), "--realtime", "--speed", "5"]))
    assert time.monotonic() - started >= 0.2  # 1.0 s of transcript at 5x
    got = entries(redis_server, "rt")
    assert [e.text for e in got] == ["t0", "t1", "t2", ""]
    assert [e.ts for e in got[:3]] == [0.0, 0.5, 1.0]


def test_cli_follow_with_idle_timeout(runner: CliRunner, redis_server: RedisServer,
                                      tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    path.write_text('{"text": "first", "speaker": "A"}\n')

    def writer() -> None:
        time.sleep(0.4)
        with path.open("a") as handle:
            handle.write('{"text": "second"}\n{"text": "thi')
            handle.flush()
            time.sleep(0.3)
            handle.write('rd", "ts": 3}\n')

    thread = threading.Thread(target=writer)
    thread.start()
    result = runner.invoke(cli.app, ["publish", "tail", str(path), "--follow",
                                     "--idle-timeout", "1.2"])
    thread.join()
    _ok(result)
    got = entries(redis_server, "tail")
    assert turns_of(got) == [Turn("first", "A"), Turn("second"), Turn("third", None, 3.0)]
    assert got[-1].eos


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["publish", "a}:x", "-"], ["invalid stream id 'a}:x'"]),
        (["publish", "a b", "-"], ["invalid stream id"]),
        (["publish", "x" * 200, "-"], ["1..128 characters"]),
        (["publish", "ok", "/nonexistent/file.txt"], ["cannot read /nonexistent/file.txt"]),
        (["publish", "ok", "-", "--format", "docx"], ["unknown --format 'docx'"]),
        (["publish", "ok", "-", "--follow"], ["--follow needs a FILE"]),
        (["publish", "ok", str(SAMPLES / "standup.vtt"), "--follow"], ["line formats"]),
    ],
)
def test_cli_user_errors_are_clear(runner: CliRunner, args: list[str],
                                   needles: list[str]) -> None:
    _user_error(runner.invoke(cli.app, args, input=""), *needles)


def test_cli_non_utf8_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Alice: ok\nBob: na\xefve\n")
    _user_error(runner.invoke(cli.app, ["publish", "s", str(path)]),
                "not valid UTF-8 at byte offset 17 (line 2)")


def test_cli_redis_unreachable(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("SINKSTREAM_REDIS_URL", url)
    monkeypatch.setenv("SINKSTREAM_REDIS_SOCKET_TIMEOUT", "1")
    _user_error(runner.invoke(cli.app, ["publish", "s", "-"], input="hi\n"),
                f"cannot reach Redis at {url}", "SINKSTREAM_REDIS_URL")
    _user_error(runner.invoke(cli.app, ["streams"]), f"cannot reach Redis at {url}")


def test_cli_full_stream_with_on_full_fail(runner: CliRunner, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINKSTREAM_MAX_STREAM_LENGTH", "10")
    monkeypatch.setenv("SINKSTREAM_ON_FULL", "fail")
    path = tmp_path / "many.txt"
    path.write_text("".join(f"line {i}\n" for i in range(20)))
    _user_error(runner.invoke(cli.app, ["publish", "s", str(path)]), "is full (10/10 entries)")
