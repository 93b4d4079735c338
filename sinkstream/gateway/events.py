"""``GET /v1/streams/{id}/events``: Server-Sent Events of summaries, notes and answers.

Each event is one output entry as it is committed: ``id`` is the output entry id, ``event``
its kind (``rolling``, ``final``, ``on_demand``, ``answer``), ``data`` the JSON view
(``sinkstream.gateway.notes.output_view``). A client that reconnects sends the last id it
saw as ``Last-Event-ID`` (browsers do this by themselves) and gets everything after it, from
this process or, after a restart, from the next one: the catch-up reads Redis, the live tail
comes from the process's single reader (``hub.py``). A comment line every
``gateway_heartbeat_seconds`` keeps proxies from closing a quiet stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from monitoring import gateway_metrics as m
from sinkstream.gateway.access import Access, gateway, require
from sinkstream.gateway.context import Gateway, build_events
from sinkstream.gateway.hub import Event, Subscriber
from sinkstream.gateway.notes import read_outputs
from sinkstream.ids import entry_id_key, parse_entry_id

router = APIRouter(tags=["reading"])
#: milliseconds a browser waits before reconnecting (the SSE ``retry:`` field)
RETRY_MS = 1000


def _start(last_event_id: str | None, after: str | None) -> str | None:
    """Where the client resumes: its Last-Event-ID (a reconnect), else ``?after=``
    (``0`` = from the beginning), else None (only what comes next)."""
    value = last_event_id or after
    if value is None or value == "":
        return None
    if value in ("0", "0-0"):
        return "0-0"
    try:
        parse_entry_id(value)
    except ValueError as exc:
        raise HTTPException(422, f"Last-Event-ID / after: {exc}") from None
    return value


def _sse(event: Event) -> ServerSentEvent:
    return ServerSentEvent(data=event.data, event=event.kind, id=event.id, retry=RETRY_MS)


async def _catch_up(gw: Gateway, sub: Subscriber, after: str) -> AsyncIterator[Event]:
    """What was committed after ``after`` up to the moment ``sub`` registered, from Redis,
    in pages."""
    while entry_id_key(after) < entry_id_key(sub.cursor):
        raw = await run_in_threadpool(read_outputs, gw.hub.client, sub.stream_id, after,
                                      sub.cursor)
        if not raw:
            return
        for event in await run_in_threadpool(build_events, gw.hub.client, sub.stream_id, raw):
            yield event
        after = raw[-1][0]


async def _stream(gw: Gateway, stream_id: str, after: str | None
                  ) -> AsyncIterator[ServerSentEvent]:
    """Registered inside the generator, so a client gone before the first byte leaves no
    subscriber behind."""
    sub = await gw.hub.subscribe(stream_id)
    m.SSE_CLIENTS.inc()
    last = after or sub.cursor
    try:
        if after is not None:
            async for event in _catch_up(gw, sub, after):
                last = event.id
                m.SSE_EVENTS.inc()
                yield _sse(event)
        while True:
            live = await sub.next()
            if live is None:  # too far behind, or shutting down: the client reconnects
                return
            if entry_id_key(live.id) <= entry_id_key(last):
                continue
            last = live.id
            m.SSE_EVENTS.inc()
            yield _sse(live)
    finally:
        m.SSE_CLIENTS.dec()
        gw.hub.unsubscribe(sub)


@router.get("/v1/streams/{stream_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 401: {}, 403: {},
                       422: {}})
async def events(access: Access = Depends(require("read")), gw: Gateway = Depends(gateway),
                 last_event_id: str | None = Header(None, alias="Last-Event-ID"),
                 after: str | None = Query(None, description="resume after this output entry "
                                                             "id; 0 = from the beginning"),
                 ) -> Any:
    """Follow the stream's summaries, notes and answers as they are committed. Needs
    ``read``."""
    start = _start(last_event_id, after)
    return EventSourceResponse(
        _stream(gw, access.stream_id, start), ping=gw.settings.gateway_heartbeat_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}, send_timeout=30)
