"""``sinkstream resume``: put a parked stream back to work once its cause is fixed."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape

from sinkstream.cli.common import connect_redis, console, settings, stream_keys


def resume_cmd(
    stream: Annotated[str, typer.Argument(help="the stream marked failed")],
) -> None:
    """Put a stream marked failed back to work, once its cause is fixed.

    Clears the failure: workers take the stream up again from its committed state within
    the dispatcher's next pass. Nothing is reset or skipped; if the cause (a damaged
    state, a worker with another model) is still there, its next batch parks it again with
    the same reason."""
    from state_store.store import StateStore

    keys = stream_keys(stream)
    store = StateStore(connect_redis(settings()))
    failure = store.failure(keys.stream_id)
    if failure is None or not store.clear_failure(keys.stream_id):
        console.print(f"stream {escape(stream)!r} is not parked: nothing to resume")
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.failed_at))
    console.print(f"resumed {escape(stream)!r}, parked since {since} for: "
                  f"{escape(failure.reason)}")
    console.print(f"[dim]`sinkstream status {escape(stream)}` shows whether it applies input "
                  "again or is parked anew[/dim]")
