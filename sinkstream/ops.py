"""``sinkstream worker|follow|summarize|ask|status|demo``: running and watching streams."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sinkstream.cli import _connect_redis_or_fail, app, console, fail, settings
from sinkstream.settings import Settings
from state_store.keys import InvalidStreamId, StreamKeys

SAMPLE = Path(__file__).parent / "samples" / "launch-review.vtt"


def _keys(stream: str) -> StreamKeys:
    try:
        return StreamKeys.of(stream)
    except InvalidStreamId as exc:
        raise fail(str(exc)) from None


# ----- worker -------------------------------------------------------------------------------
@app.command("worker")
def worker_cmd(
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    name: Annotated[str | None, typer.Option(help="worker node name")] = None,
) -> None:
    """Run one worker process (solo pool: one process per GPU; start more for more GPUs).

    Wraps `celery -A workers.app worker` with the defaults sinkstream needs: solo pool,
    prefetch 1, late acks, the sinkstream queue. Serves /metrics on
    SINKSTREAM_METRICS_HOST:SINKSTREAM_METRICS_PORT. Ctrl-C / SIGTERM finish the batch in
    flight (it commits or is dropped whole) and stop.
    """
    settings()  # fail early, with a readable message, on invalid settings
    from workers.app import QUEUE
    from workers.tasks import app as celery_app

    node = name or f"sinkstream-{os.getpid()}@%h"
    celery_app.worker_main([
        "worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1", "-Q", QUEUE,
        f"--loglevel={loglevel}", "-n", node, "--without-gossip", "--without-mingle",
        "--without-heartbeat",
    ])


# ----- follow / summarize / ask ---------------------------------------------------------------
def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }


def read_outputs(
    client: redis.Redis, stream: str, *, from_start: bool = False, after: str | None = None,
    block_ms: int = 1000, stop: threading.Event | None = None,
) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield output entries as they arrive, until ``stop`` is set.

    Starts after entry id ``after`` if given, else from the beginning (``from_start``) or
    from now.
    """
    key = _keys(stream).output
    last = after or ("0-0" if from_start else "$")
    while stop is None or not stop.is_set():
        reply: Any = client.xread({key: last}, block=block_ms, count=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                yield last, _decode(fields)


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
    from workers.summaries import clock, parse_sources

    lines = []
    for i, src in enumerate(parse_sources(raw), start=1):
        when = f"{clock(src.ts[0])}-{clock(src.ts[1])}  " if src.ts is not None else ""
        who = f"{', '.join(src.speakers)}  " if src.speakers else ""
        lines.append(escape(f"[{i}] {when}{who}entries {src.entries[0]}..{src.entries[1]}  "
                            f"(score {src.score:.2f})"))
        if src.quote:
            lines.append(f"    [italic]“{escape(src.quote)}”[/italic]")
    return lines


@app.command("follow")
def follow_cmd(
    stream: Annotated[str, typer.Argument(help="stream id")],
    from_start: Annotated[bool, typer.Option("--from-start", help="show earlier ones too")] = False,
    until_final: Annotated[bool, typer.Option(help="exit after the final summary")] = False,
) -> None:
    """Print summaries of STREAM as they arrive (Ctrl-C to stop)."""
    client = _connect_redis_or_fail(settings())
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
    client = _connect_redis_or_fail(cfg)
    keys = _keys(stream)
    if not client.exists(keys.state):
        raise fail(f"stream {stream!r} has no committed state yet: publish to it and start a "
                   "worker (sinkstream worker), or check `sinkstream streams`")
    from workers.tasks import summarize

    request = secrets.token_hex(8)
    sent_at = f"{int(time.time() * 1000) - 1}-0"  # an answer can land before the first read
    summarize.apply_async(args=[stream, request, question])
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


@app.command("summarize")
def summarize_cmd(
    stream: Annotated[str, typer.Argument(help="stream id")],
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 300.0,
) -> None:
    """Summarize STREAM now, from its committed state, and print the summary."""
    print_output(_request(stream, "", timeout))


@app.command("ask")
def ask_cmd(
    stream: Annotated[str, typer.Argument(help="stream id")],
    question: Annotated[str, typer.Argument(help="question about the stream")],
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 300.0,
) -> None:
    """Answer QUESTION about STREAM from its committed state."""
    print_output(_request(stream, question, timeout))


# ----- status -------------------------------------------------------------------------------
def stream_status(client: redis.Redis, stream: str) -> dict[str, Any]:
    """Offset, lag, tokens, state bytes, last summary and failure of one stream."""
    from state_store.store import StateStore
    from workers.scheduling import entry_id_key

    keys = _keys(stream)
    info = StateStore(client).info(stream)
    meta = _decode(client.hgetall(keys.meta))
    last_id = info.last_entry_id if info else None
    pending: Any = client.xrange(keys.input, min=f"({last_id}" if last_id else "-", count=10_001)
    pending = [e for e in pending if entry_id_key(e[0]) > entry_id_key(last_id)]
    oldest_age = (time.time() - entry_id_key(pending[0][0])[0] / 1000) if pending else 0.0
    return {
        "stream": stream,
        "status": meta.get("status", "ok") + (" (ended)" if meta.get("ended") else ""),
        "offset": last_id or "-",
        "lag_entries": len(pending) if len(pending) <= 10_000 else ">10000",
        "oldest_unapplied_s": round(oldest_age, 1),
        "tokens_seen": int(meta.get("tokens_seen", 0) or 0),
        "state_bytes": info.nbytes if info else 0,
        "version": info.version if info else 0,
        "last_summary": _ago(meta.get("last_summary_ts")),
        "dead_letters": client.xlen(keys.dead),
        "failure": meta.get("failure_reason", ""),
    }


def _ago(ts: str | None) -> str:
    if not ts:
        return "never"
    return f"{time.time() - float(ts):.0f}s ago"


@app.command("status")
def status_cmd(
    stream: Annotated[str | None, typer.Argument(help="one stream (default: all known)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines, for scripts")] = False,
) -> None:
    """Offset, lag, tokens seen, state bytes, last summary time and failures per stream."""
    from producer.registry import list_streams

    client = _connect_redis_or_fail(settings())
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


# ----- demo ---------------------------------------------------------------------------------
@app.command("demo")
def demo_cmd(
    file: Annotated[Path | None, typer.Option(help="VTT/SRT/JSONL/QMSum/text transcript")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="format of --file")] = None,
    speed: Annotated[float, typer.Option(help="replay speed, x real time")] = 8.0,
    model: Annotated[str | None, typer.Option(help="model spec (default from settings)")] = None,
    summary_every: Annotated[int, typer.Option(help="tokens between rolling summaries")] = 256,
    stream: Annotated[str, typer.Option(help="stream id")] = "demo",
) -> None:
    """Run everything locally: a private Redis, one worker, a transcript replayed live, and
    summaries printed as they arrive. Ctrl-C stops and cleans up."""
    from producer.formats import read_file
    from sinkstream.localredis import RedisServer, free_port

    cfg = settings()
    source = file or SAMPLE
    try:
        turns = read_file(source, fmt)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot read {source}: {exc}") from None
    workdir = Path(tempfile.mkdtemp(prefix="sinkstream-demo-"))
    server = RedisServer(workdir / "redis")
    metrics_port = free_port()
    env = {**os.environ, "SINKSTREAM_REDIS_URL": server.url, "SINKSTREAM_BROKER_URL": server.url,
           "SINKSTREAM_MODEL": model or cfg.model, "SINKSTREAM_METRICS_PORT": str(metrics_port),
           "SINKSTREAM_SUMMARY_EVERY_TOKENS": str(summary_every),
           "SINKSTREAM_DISPATCH_INTERVAL_SECONDS": "0.1"}
    worker: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        console.print(f"[bold]redis[/] {server.url}  (private, in {workdir})")
        log_path = workdir / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "worker", "--loglevel", "WARNING"],
            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        console.print(f"[bold]worker[/] pid {worker.pid}, model {env['SINKSTREAM_MODEL']}, "
                      f"log {log_path}")
        console.print(f"[bold]metrics[/] http://127.0.0.1:{metrics_port}/metrics")
        _wait_for_worker(metrics_port, worker, log_path)
        demo_settings = Settings(redis_url=server.url)
        _run_demo(demo_settings, stream, turns, speed, source.name)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: cleaning up[/]")
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        server.stop()


def _wait_for_worker(port: int, worker: subprocess.Popen[bytes], log_path: Path) -> None:
    """The worker serves /metrics once it is ready (model loaded)."""
    import urllib.request

    with console.status("starting the worker and loading the model..."):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise fail(f"the worker exited with {worker.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
    raise fail(f"the worker did not start in time; see {log_path}")


def _run_demo(cfg: Settings, stream: str, turns: list[Any], speed: float, name: str) -> None:
    from producer.publisher import Producer
    from producer.replay import replay

    client = redis.Redis.from_url(cfg.redis_url)
    stop = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with Progress(TextColumn("[bold]replaying[/] " + name), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                          transient=True) as progress:
                task = progress.add_task("turns", total=len(turns))
                producer = Producer(settings=cfg)
                replay(producer, stream, turns, realtime=True, speed=speed, eos=True,
                       on_progress=lambda n: progress.advance(task, n))
            console.print(f"[dim]published {len(turns)} turns and the end-of-stream marker[/]")
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)
            stop.set()
        finally:
            # the final summary may take a while on a CPU; give up 10 minutes after the end
            threading.Timer(600, stop.set).start()

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        for _, fields in read_outputs(client, stream, from_start=True, stop=stop):
            print_output(fields)
            if fields.get("kind") == "final":
                break
    finally:
        stop.set()
    if errors:
        raise fail(f"publishing failed: {errors[0]}")
    console.print(f"[bold green]done.[/] Try: sinkstream status {stream}")


# ----- exporter -----------------------------------------------------------------------------
@app.command("exporter")
def exporter_cmd(
    interval: Annotated[float, typer.Option(
        help="seconds between passes over Redis", envvar="SINKSTREAM_EXPORTER_INTERVAL",
        min=0.1)] = 10.0,
    top_k: Annotated[int, typer.Option(
        "--top-k", help="also export the K most lagging streams with a stream label (0: none)",
        envvar="SINKSTREAM_EXPORTER_TOP_K", min=0, max=100)] = 0,
    max_streams: Annotated[int, typer.Option(
        help="read at most this many registered streams (most recently active first)",
        envvar="SINKSTREAM_EXPORTER_MAX_STREAMS", min=1)] = 100_000,
    count_cap: Annotated[int, typer.Option(
        help="count at most this many unapplied entries per stream (untrimmed input only)",
        min=1)] = 10_000,
    once: Annotated[bool, typer.Option("--once", help="print the metrics once and exit")] = False,
) -> None:
    """Export input lag and stream health from Redis on /metrics, with or without workers.

    Serves SINKSTREAM_METRICS_HOST:SINKSTREAM_METRICS_PORT. Run one per Redis. Every
    INTERVAL seconds it reads each registered stream's committed entry id and unapplied input
    (one pipelined, bounded script per stream) and exports totals, the oldest unapplied age, a
    per-stream age histogram, stream counts by status, stored state bytes and dead letters.
    """
    from monitoring.exporter import render_once, run_exporter

    cfg = settings()
    if once:
        client = _connect_redis_or_fail(cfg)
        typer.echo(render_once(client, top_k=top_k, max_streams=max_streams,
                               count_cap=count_cap).decode(), nl=False)
        return
    if cfg.metrics_port == 0:
        raise fail("the exporter needs a port: set SINKSTREAM_METRICS_PORT (0 disables it)")
    from state_store.connection import redis_from_settings

    client = redis_from_settings(cfg, client_name="sinkstream-exporter")
    try:
        run_exporter(client, cfg.metrics_host, cfg.metrics_port, interval_s=interval,
                     top_k=top_k, max_streams=max_streams, count_cap=count_cap)
    except OSError as exc:
        raise fail(f"cannot serve /metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc}") \
            from None
