"""The ``sinkstream`` command line: one entry point for producers, workers and operators."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.markup import escape

from sinkstream.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="sinkstream",
    help="Keep a language model listening to live text streams and summarizing them.\n\n"
    "Settings come from SINKSTREAM_* environment variables and an optional TOML file "
    "(--config or SINKSTREAM_CONFIG).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)


class _State:
    config: Path | None = None
    settings: Settings | None = None


_state = _State()


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file", envvar="SINKSTREAM_CONFIG"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    _state.config = config
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def settings(**overrides: object) -> Settings:
    """Settings for this invocation; exits with a readable message when they are invalid."""
    if _state.settings is None or overrides:
        try:
            loaded = load_settings(_state.config, **overrides)
        except SettingsError as exc:
            err_console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        if overrides:
            return loaded
        _state.settings = loaded
    return _state.settings


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an actionable error and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


# ----- sinkstream model ... ---------------------------------------------------------------

model_app = typer.Typer(
    help="Prepare and inspect the model (SINKSTREAM_MODEL; default: smollm2).",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")

_SPEC_HELP = (
    "smollm2 | /path/to/hf-dir | /path/to/model.gguf | rwkv:/path/model.pth | "
    "tiny-llama[:seed] | tiny-qwen2[:seed] | tiny-rwkv[:seed] | ORG/NAME (hub); "
    "default: the model setting"
)


def _model_error(exc: Exception) -> typer.Exit:
    """Like ``fail`` but unwrapped and unformatted: model errors carry a list of valid specs."""
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(1)


@model_app.command("prepare")
def model_prepare(
    spec: Annotated[str | None, typer.Argument(help=_SPEC_HELP, show_default=False)] = None,
) -> None:
    """Convert and cache the model once (GGUF -> safetensors), so workers start in a second.

    Idempotent: a second run finds the cache and says so.
    """
    from workers.engines.base import EngineError
    from workers.engines.loading import prepare_model

    cfg = settings()
    text = spec if spec is not None else cfg.model
    try:
        prepared = prepare_model(text, cfg)
    except EngineError as exc:
        raise _model_error(exc) from None
    where, took = prepared.directory, f"{prepared.seconds:.1f} s"
    message = {
        "converted": f"converted into {where} ({took})",
        "cached": f"already cached in {where} ({took})",
        "in-place": f"nothing to prepare: loads from {where} in place",
        "written": f"tiny checkpoint ready at {where} ({took})",
        "fetched": f"fetched {where} into the Hugging Face cache ({took})",
        "seeded": "nothing to prepare: tiny models are built from their seed at load",
    }.get(prepared.action, f"ready at {where} ({took})")
    console.print(f"{text}: {message}", soft_wrap=True)
    if prepared.action == "cached" and prepared.info.get("convert_seconds"):
        console.print(f"  (the conversion took {prepared.info['convert_seconds']:.1f} s)")


@model_app.command("info")
def model_info(
    spec: Annotated[str | None, typer.Argument(help=_SPEC_HELP, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Load the model and show its architecture, size, fingerprint and per-stream state bytes
    at the current settings (sink_tokens, recent_tokens, dtype)."""
    import json

    from workers.engines.base import EngineError
    from workers.engines.loading import describe_engine, load_engine

    cfg = settings() if spec is None else settings(model=spec)
    try:
        engine = load_engine(cfg)
    except EngineError as exc:
        raise _model_error(exc) from None
    info = describe_engine(engine, cfg)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    from rich.table import Table

    table = Table(title=f"model {cfg.model}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, str(value))
    console.print(table)


# ----- sinkstream publish / streams (producer) --------------------------------------------


def _connect_redis_or_fail(cfg: Settings) -> redis.Redis:
    """A pinged client for the data Redis, or a clear message naming the URL and the fix."""
    from state_store.connection import describe_redis_error, redis_from_settings

    client = redis_from_settings(cfg, client_name="sinkstream-cli")
    try:
        client.ping()
    except redis.RedisError as exc:
        raise fail(escape(describe_redis_error(cfg.redis_url, exc))) from None
    return client


@app.command("publish")
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
) -> None:
    """Publish a transcript (text, jsonl, vtt, srt or QMSum JSON) onto a stream's input.

    Retries after connection errors never duplicate entries.
    A full stream blocks or fails as SINKSTREAM_ON_FULL says.
    Texts over SINKSTREAM_MAX_ENTRY_BYTES are split at whitespace.
    """
    from producer.formats import FORMATS, InputFormatError, guess_format
    from producer.publisher import Producer, StreamFullError
    from state_store.connection import describe_redis_error
    from state_store.keys import InvalidStreamId, StreamKeys

    cfg = settings()
    try:
        keys = StreamKeys.of(stream)
    except InvalidStreamId as exc:
        raise fail(escape(str(exc)), 2) from None
    fmt = fmt or guess_format(file)
    if fmt not in FORMATS:
        raise fail(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}", 2)
    if follow and (file == "-" or realtime):
        raise fail("--follow needs a FILE (not stdin) and cannot be combined with --realtime", 2)
    try:
        source = _publish_source(file, fmt, follow, speakers, idle_timeout)
        client = _connect_redis_or_fail(cfg)
        with Producer(client, settings=cfg) as producer:
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


@app.command("streams")
def streams_cmd(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="most recent N")] = 100,
) -> None:
    """List known streams (most recently active first): input length, last entry, ended?"""
    import datetime as dt

    from rich.table import Table

    from producer.registry import list_streams
    from state_store.connection import describe_redis_error

    cfg = settings()
    client = _connect_redis_or_fail(cfg)
    try:
        infos = list_streams(client, limit)
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
    table.add_column("entries", justify="right")
    table.add_column("last entry (UTC)")
    table.add_column("last activity", justify="right")
    table.add_column("ended", justify="center")
    for info in infos:
        table.add_row(info.stream_id, f"{info.length:,}", stamp(info.last_entry_time),
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


# worker, follow, summarize, ask, status and demo live in their own module
from sinkstream import ops  # noqa: E402,F401


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
