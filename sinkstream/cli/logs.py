"""``sinkstream logs STREAM``: a log stream's template table, as committed by its workers, and
the lines of one template it keeps."""

from __future__ import annotations

import json
from typing import Annotated, Any

import redis
import typer
from rich.markup import escape
from rich.table import Table

from sinkstream.cli.common import connect_redis, console, fail, settings, stream_keys


def logs_cmd(
    stream: Annotated[str, typer.Argument(help="a log stream's id")],
    top: Annotated[int, typer.Option("--top", "-n", min=1, help="most frequent N templates")]
    = 30,
    problems: Annotated[bool, typer.Option("--problems", help="error and warning templates "
                                                              "only")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines, for scripts")]
    = False,
    lines: Annotated[str | None, typer.Option(
        "--lines", metavar="T<id>", help="instead: the latest lines of this template the "
        "stream keeps (log_keep_lines), as many as --top")] = None,
) -> None:
    """Print the template table of a log stream: count, level, first and last time, template.

    Read from what the workers committed (the stream's logs hash); a stream that has no log
    lines yet says so. With --lines T<id>, the latest kept lines of one template instead.
    """
    from state_store.connection import describe_redis_error
    from workers.logs import head as logs_head
    from workers.logs import notes
    from workers.logs.mining import MiningConfig
    from workers.logs.retention import kept_lines
    from workers.logs.table import BurstConfig
    from workers.processing.log_batches import LOG_STATE_ERRORS

    cfg = settings()
    keys = stream_keys(stream)
    client = connect_redis(cfg)
    try:
        head = logs_head.read(client, keys.stream_id)
    except redis.RedisError as exc:
        raise fail(escape(describe_redis_error(cfg.redis_url, exc))) from None
    if not head.has_logs:
        raise fail(f"stream {keys.stream_id!r} has no log lines yet (publish with --kind log)")
    try:
        miner, table = head.load(MiningConfig(), BurstConfig())
    except LOG_STATE_ERRORS as exc:
        raise fail(escape(f"stream {keys.stream_id!r}: logs unreadable: {exc}")) from None
    if lines is not None:
        keep = kept_lines(cfg.log_keep_lines, cfg.max_stream_length)
        _template_lines(client, keys.stream_id, head.applied, miner, lines, top, as_json, keep)
        return
    wanted = {s.template_id for s in table.problems()} if problems else None
    rows = [r for r in notes.template_rows(table) if wanted is None or r["id"] in wanted][:top]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    out = Table(title=f"{escape(keys.stream_id)}: {table.lines:,} lines, "
                      f"{len(table.templates):,} templates, {len(table.incidents)} bursts "
                      f"(as of entry {head.applied})")
    for column, justify in (("id", "right"), ("count", "right"), ("level", "left"),
                            ("first (UTC)", "left"), ("last (UTC)", "left"),
                            ("template", "left")):
        out.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        out.add_row(f"T{row['id']}", f"{row['count']:,}", str(row["level"]), str(row["first"]),
                    str(row["last"]), escape(notes.shown(str(row["template"]))))
    console.print(out)


def _template_lines(client: redis.Redis, stream_id: str, applied: str | None, miner: Any,
                    template: str, top: int, as_json: bool, keep: int) -> None:
    """The latest ``top`` of the ``keep`` kept lines of ``template`` (``T9`` or ``9``),
    oldest first."""
    from workers.logs.retention import read_kept
    from workers.processing.log_answers import quote

    wanted = template.upper().removeprefix("T")
    if not wanted.isdigit() or miner.template(int(wanted)) is None:
        raise fail(f"no template {template!r} in {stream_id!r}: `sinkstream logs {stream_id}` "
                   "lists them")
    kept = read_kept(client, stream_id, applied, keep)
    found = [k for k in kept if miner.match(k.record.message) == int(wanted)][-top:]
    for line in found:
        if as_json:
            typer.echo(json.dumps({"entry": line.entry_id, "ts": line.ts,
                                   "level": line.record.level,
                                   "message": line.record.message}))
        else:
            console.print(escape(quote(line)), soft_wrap=True)  # as an answer quotes it
    if not found and not as_json:
        console.print(f"no line of T{wanted} among the {len(kept):,} lines the stream keeps")
