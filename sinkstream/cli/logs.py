"""``sinkstream logs STREAM``: a log stream's template table, as committed by its workers."""

from __future__ import annotations

import json
from typing import Annotated

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
) -> None:
    """Print the template table of a log stream: count, level, first and last time, template.

    Read from what the workers committed (the stream's logs hash); a stream that has no log
    lines yet says so.
    """
    from state_store.connection import describe_redis_error
    from workers.logs import head as logs_head
    from workers.logs import notes
    from workers.logs.mining import MinerStateError, MiningConfig
    from workers.logs.table import BurstConfig, TableStateError

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
        _, table = head.load(MiningConfig(), BurstConfig())
    except (MinerStateError, TableStateError) as exc:
        raise fail(escape(f"stream {keys.stream_id!r}: logs unreadable: {exc}")) from None
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
