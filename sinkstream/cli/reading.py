"""``sinkstream follow | summarize | ask | status``: reading what the workers publish."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import redis
import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from sinkstream.cli.common import connect_redis, console, fail, settings, stream_keys
from state_store.replies import text_fields


def read_outputs(
    client: redis.Redis, stream: str, *, from_start: bool = False, after: str | None = None,
    block_ms: int = 1000, stop: threading.Event | None = None,
) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield output entries as they arrive, until ``stop`` is set.

    Starts after entry id ``after`` if given, else from the beginning (``from_start``) or
    from now.
    """
    key = stream_keys(stream).output
    last = after or ("0-0" if from_start else "$")
    while stop is None or not stop.is_set():
        reply: Any = client.xread({key: last}, block=block_ms, count=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                yield last, text_fields(fields)


def print_output(fields: dict[str, str]) -> None:
    kind = fields.get("kind", "?")
    colour = {"final": "green", "rolling": "cyan", "answer": "magenta"}.get(kind, "white")
    when = time.strftime("%H:%M:%S", time.localtime(float(fields.get("ts", "0") or 0)))
    title = (f"[bold {colour}]{kind}[/] summary  ·  {when}  ·  "
             f"{fields.get('tokens_seen', '?')} tokens  ·  up to entry {fields.get('covers', '')}")
    if kind == "answer":
        title = f"[bold {colour}]answer[/]  ·  {when}"
    body = escape(fields.get("text", "").strip()) or "[dim](empty)[/dim]"
    citations = format_sources(fields.get("sources", ""))
    if kind == "answer":
        citations = citations or ["[dim]rests on the recent window only (up to entry "
                                  f"{escape(fields.get('covers', ''))}); no earlier text "
                                  "retrieved[/dim]"]
    if citations:
        body += "\n\n[bold]Sources[/bold]\n" + "\n".join(citations)
    console.print(Panel(body, title=title, title_align="left", border_style=colour))


def format_sources(raw: str) -> list[str]:
    """One readable line per cited source: ``[1] 12:03-14:40  Alice, Bob  entries A..B``,
    and under the source an answer quotes, the quoted line."""
    from sinkstream.contracts.outputs import clock, parse_sources

    lines = []
    for i, src in enumerate(parse_sources(raw), start=1):
        when = f"{clock(src.ts[0])}-{clock(src.ts[1])}  " if src.ts is not None else ""
        who = f"{', '.join(src.speakers)}  " if src.speakers else ""
        lines.append(escape(f"[{i}] {when}{who}entries {src.entries[0]}..{src.entries[1]}  "
                            f"(score {src.score:.2f})"))
        if src.quote:
            lines.append(f"    [italic]“{escape(src.quote)}”[/italic]")
    return lines


def follow_cmd(
    stream: Annotated[str, typer.Argument(help="stream id")],
    from_start: Annotated[bool, typer.Option("--from-start", help="show earlier ones too")] = False,
    until_final: Annotated[bool, typer.Option(help="exit after the final summary")] = False,
) -> None:
    """Print summaries of STREAM as they arrive (Ctrl-C to stop)."""
    client = connect_redis(settings())
    try:
        for _, fields in read_outputs(client, stream, from_start=from_start):
            print_output(fields)
            if until_final and fields.get("kind") == "final":
                return
    except KeyboardInterrupt:
        return


def _request(stream: str, question: str, timeout: float) -> dict[str, str]:
    """Ask a worker for an on-demand summary/answer and wait for it on the output stream."""
    cfg = settings()
    client = connect_redis(cfg)
    keys = stream_keys(stream)
    if not client.exists(keys.state):
        raise fail(f"stream {stream!r} has no committed state yet: publish to it and start a "
                   "worker (sinkstream worker), or check `sinkstream streams`")
    from sinkstream.contracts.tasks import SUMMARIZE
    from workers.app import create_app

    request = secrets.token_hex(8)
    sent_at = f"{int(time.time() * 1000) - 1}-0"  # an answer can land before the first read
    create_app(cfg, register_tasks=False).send_task(
        SUMMARIZE, args=[stream, request, question], queue=cfg.broker_queue)
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        for _, fields in read_outputs(client, stream, after=sent_at, block_ms=500, stop=stop):
            if fields.get("request") == request:
                return fields
    finally:
        timer.cancel()
    raise fail(f"no answer within {timeout:.0f}s: is a worker running? (sinkstream worker)")


def summarize_cmd(
    stream: Annotated[str, typer.Argument(help="stream id")],
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 300.0,
) -> None:
    """Summarize STREAM now, from its committed state, and print the summary."""
    print_output(_request(stream, "", timeout))


def ask_cmd(
    stream: Annotated[str, typer.Argument(help="stream id")],
    question: Annotated[str, typer.Argument(help="question about the stream")],
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 300.0,
) -> None:
    """Answer QUESTION about STREAM from its committed state."""
    print_output(_request(stream, question, timeout))


# ----- status -------------------------------------------------------------------------------
def stream_status(client: redis.Redis, stream: str) -> dict[str, Any]:
    """Offset, lag, entries applied, last entry time, ended, tokens, state bytes, last summary
    and failure of one stream: the lag as the exporter computes it (``monitoring.lag``, one
    script on the stream's shard); entries and the end from what the workers committed, so a
    finished stream whose input was trimmed still shows them."""
    from monitoring.lag import LagReader
    from producer.registry import describe_streams
    from state_store.health import Deferral, shown_status
    from state_store.store import StateStore

    keys = stream_keys(stream)
    lag = LagReader(client).read_batch([keys.stream_id])[0]
    info = StateStore(client).info(stream)
    meta = text_fields(client.hgetall(keys.meta))
    listed = describe_streams(client, [(keys.stream_id, 0.0)])[0]
    last_entry = listed.last_entry_time
    deferral = Deferral.of(meta, info.version if info else 0)
    return {
        "stream": stream,
        "status": shown_status(lag.status, deferral),
        "offset": lag.last_entry_id or "-",
        "applied_entries": listed.applied,
        "last_entry": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(last_entry))
        if last_entry is not None else "-",
        "ended": listed.ended,
        "lag_entries": f">={lag.pending}" if lag.capped else lag.pending,
        "oldest_unapplied_s": round(lag.oldest_age_s, 1),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
        "state_bytes": lag.state_bytes,
        "version": info.version if info else 0,
        "last_summary": _ago(meta.get("last_summary_ts")),
        "dead_letters": lag.dead_letters,
        "failure": meta.get("failure_reason", ""),
        # left by its workers to an upgraded one (a newer build wrote it): why
        "deferred": deferral.reason if deferral else "",
    }


def _ago(ts: str | None) -> str:
    if not ts:
        return "never"
    return f"{time.time() - float(ts):.0f}s ago"


def status_cmd(
    stream: Annotated[str | None, typer.Argument(help="one stream (default: all known)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines, for scripts")] = False,
) -> None:
    """Offset, lag, tokens seen, state bytes, last summary time and failures per stream."""
    from producer.registry import list_streams

    client = connect_redis(settings())
    ids = [stream] if stream else [s.stream_id for s in list_streams(client, limit=1000)]
    if not ids:
        console.print("no streams yet: publish one with `sinkstream publish STREAM FILE`")
        return
    rows = [stream_status(client, sid) for sid in ids]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table(title="sinkstream status")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    console.print(_workers_line(client))


def _workers_line(client: redis.Redis) -> str:
    """How many worker task slots have a live heartbeat: 0 means nothing applies new input."""
    from state_store.presence import live_slots

    try:
        live = live_slots(client)
    except redis.RedisError as exc:
        return f"live workers: unknown ({exc})"
    if live == 0:
        return "live workers: none (start one with `sinkstream worker`)"
    return f"live workers: {live} task slot{'s' if live != 1 else ''}"
