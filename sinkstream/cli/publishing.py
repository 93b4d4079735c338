"""``sinkstream publish`` and ``sinkstream streams``: the producer side."""

from __future__ import annotations

from typing import Annotated, Any

import redis
import typer
from rich.markup import escape

from sinkstream.cli.common import (
    connect_redis,
    console,
    err_console,
    fail,
    settings,
    stream_keys,
)


def publish_cmd(
    stream: Annotated[str, typer.Argument(help="stream id: letters, digits, '.', '_', '-'")],
    file: Annotated[str, typer.Argument(help="transcript file, or - for stdin")] = "-",
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", show_default=False,
            help="text | jsonl | vtt | srt | qmsum (default: from the file suffix, else text)",
        ),
    ] = None,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="publish each turn when its timestamp comes due")
    ] = False,
    speed: Annotated[
        float, typer.Option("--speed", min=0.001, help="with --realtime: X times real time")
    ] = 1.0,
    follow: Annotated[
        bool, typer.Option("--follow", help="keep publishing lines appended to FILE (tail -f)")
    ] = False,
    idle_timeout: Annotated[
        float | None,
        typer.Option("--idle-timeout", min=0, help="with --follow: stop after S idle seconds"),
    ] = None,
    eos: Annotated[
        bool,
        typer.Option(
            "--eos/--no-eos",
            help="mark the end of the stream when the input ends (for --follow and stdin: "
            "also on Ctrl-C)",
        ),
    ] = True,
    speakers: Annotated[
        bool, typer.Option("--speakers/--no-speakers", help="detect 'Name: text' prefixes")
    ] = True,
    kind: Annotated[
        str | None,
        typer.Option("--kind", "-k", show_default=False,
                     help="meeting | log: what the stream carries (sets the stream's kind; "
                          "log: one line per entry, read as text, no speakers)"),
    ] = None,
) -> None:
    """Publish a transcript (text, jsonl, vtt, srt or QMSum JSON) onto a stream's input.

    Retries after connection errors never duplicate entries.
    A full stream blocks or fails as SINKSTREAM_ON_FULL says.
    Texts over SINKSTREAM_MAX_ENTRY_BYTES are split at whitespace.
    """
    from producer.formats import FORMATS, InputFormatError, guess_format
    from producer.publisher import Producer, StreamFullError
    from sinkstream.contracts.kinds import LOG, parse_kind
    from state_store.connection import describe_redis_error

    cfg = settings()
    keys = stream_keys(stream)
    try:
        stream_kind = parse_kind(kind)
    except ValueError as exc:
        raise fail(escape(str(exc)), 2) from None
    if stream_kind == LOG:  # a log line is an entry as written: JSON lines stay verbatim
        fmt, speakers = fmt or "text", False
    fmt = fmt or guess_format(file)
    if fmt not in FORMATS:
        raise fail(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}", 2)
    if follow and (file == "-" or realtime):
        raise fail("--follow needs a FILE (not stdin) and cannot be combined with --realtime", 2)
    try:
        source = _publish_source(file, fmt, follow, speakers, idle_timeout)
        client = connect_redis(cfg)
        with Producer(client, settings=cfg) as producer:
            if stream_kind is not None:
                producer.set_kind(keys.stream_id, stream_kind)
            result = _publish_run(producer, keys.stream_id, source, realtime, speed, eos)
    except (InputFormatError, StreamFullError) as exc:
        raise fail(escape(str(exc))) from None
    except redis.RedisError as exc:
        raise fail(escape(describe_redis_error(cfg.redis_url, exc))) from None
    except KeyboardInterrupt:
        raise fail("interrupted; the stream was not marked as ended", 130) from None
    ended = " and marked its end" if eos else ""
    console.print(
        f"published {result.entries:,} entries to {keys.input}{ended} (last id {result.last_id})"
        + (f"; {result.duplicates} retried entries were already there" if result.duplicates else "")
    )


def _publish_source(
    file: str, fmt: str, follow: bool, speakers: bool, idle_timeout: float | None
) -> tuple[str, Any]:
    """Read what can be read before connecting, so a bad file fails fast: ("file", turns),
    ("live", batches) for stdin line formats and --follow."""
    import sys

    from producer.formats import LINE_FORMATS, parse_turns, read_file
    from producer.replay import follow as follow_file
    from producer.replay import stream_chunks

    if follow:
        return "live", follow_file(file, fmt, idle_timeout=idle_timeout, detect_speakers=speakers)
    if file != "-":
        return "file", read_file(file, fmt, detect_speakers=speakers)
    stdin = sys.stdin.buffer
    if fmt in LINE_FORMATS:
        return "live", stream_chunks(stdin, fmt, detect_speakers=speakers)
    return "file", parse_turns(stdin.read(), fmt, "<stdin>", detect_speakers=speakers)


def _publish_run(
    producer: Any, stream: str, source: tuple[str, Any], realtime: bool, speed: float, eos: bool
) -> Any:
    """Publish a file's turns with a progress bar, or a live source batch by batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from producer.replay import publish_live, replay

    kind, payload = source
    if kind == "live":
        return publish_live(producer, stream, payload, eos=eos)
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task(f"publishing to {stream}", total=len(payload))
        return replay(
            producer, stream, payload, realtime=realtime, speed=speed, eos=eos,
            on_progress=lambda n: progress.advance(task, n),
        )


def streams_cmd(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="most recent N")] = 100,
) -> None:
    """List known streams, most recently active first: waiting, applied, last entry, ended.

    Waiting counts the entries after the last applied one (from 10,000 on, shown as
    ">=10,000"); applied input is trimmed, but for the last lines a log stream keeps."""
    import datetime as dt

    from rich.table import Table

    from monitoring.lag import LagReader
    from producer.registry import list_streams
    from state_store.connection import describe_redis_error

    cfg = settings()
    client = connect_redis(cfg)
    try:
        infos = list_streams(client, limit)
        lags = LagReader(client, read_only=True).read_batch([i.stream_id for i in infos]) \
            if infos else []
    except redis.RedisError as exc:
        raise fail(escape(describe_redis_error(cfg.redis_url, exc))) from None
    if not infos:
        console.print("no streams yet; publish one with: sinkstream publish STREAM FILE")
        return
    now = dt.datetime.now(dt.timezone.utc).timestamp()

    def stamp(ts: float | None) -> str:
        if ts is None:
            return "-"
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    table = Table(title=f"streams on {escape(_redacted(cfg.redis_url))}")
    table.add_column("stream", overflow="fold")
    table.add_column("waiting", justify="right")
    table.add_column("applied", justify="right")
    table.add_column("last entry (UTC)")
    table.add_column("last activity", justify="right")
    table.add_column("ended", justify="center")
    for info, lag in zip(infos, lags, strict=True):
        waiting = f"{'>=' if lag.capped else ''}{lag.pending:,}"
        table.add_row(info.stream_id, waiting, f"{info.applied:,}",
                      stamp(info.last_entry_time),
                      f"{_ago(now - info.last_activity)} ago", "yes" if info.ended else "")
    console.print(table)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _redacted(url: str) -> str:
    from state_store.connection import redact_url

    return redact_url(url)
