"""Routes that read: the tenant's streams, one stream's status and notes, and asking.

An ask is sent to the workers the way ``sinkstream ask`` sends it: a Celery task by name
(``sinkstream.summarize``) with a request id; the answer is an output entry carrying that id.
The route waits for it on the SSE hub (it subscribes *before* sending, so a fast answer is
not missed), never with a polling loop of its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.tasks import SUMMARIZE
from sinkstream.gateway.access import COOKIE, Access, gateway, principal, require, require_scope
from sinkstream.gateway.auth import Principal
from sinkstream.gateway.context import Gateway
from sinkstream.gateway.hub import Subscriber
from sinkstream.gateway.notes import latest_outputs, output_view
from sinkstream.gateway.status import stream_known, stream_status, tenant_streams

router = APIRouter(tags=["reading"])


class AskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=2000)
    wait: bool = Field(True, description="wait for the answer (else 202 and the answer "
                                         "arrives as an 'answer' event)")
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds to wait")


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=200)


@router.get("/v1/streams", responses={401: {}, 403: {}})
def list_streams(limit: int = Query(100, ge=1, le=1000), gw: Gateway = Depends(gateway),
                 who: Principal = Depends(require_scope("read"))) -> dict[str, Any]:
    """The streams this token covers, most recently active first. Needs ``read``."""
    infos = tenant_streams(gw.client, who, limit)
    return {"streams": [{"stream": i.stream_id, "length": i.length,
                         "last_entry_id": i.last_entry_id, "last_activity": i.last_activity,
                         "ended": i.ended, "applied": i.applied} for i in infos]}


def _known(gw: Gateway, stream_id: str) -> None:
    if not stream_known(gw.client, stream_id):
        raise HTTPException(404, f"no stream {stream_id!r}: publish to it first")


@router.get("/v1/streams/{stream_id}", responses={401: {}, 403: {}, 404: {}})
def get_status(access: Access = Depends(require("read")),
               gw: Gateway = Depends(gateway)) -> dict[str, Any]:
    """Offset, lag, tokens seen, state bytes, dead letters, failure. Needs ``read``."""
    _known(gw, access.stream_id)
    return stream_status(gw.client, access.stream_id)


@router.get("/v1/streams/{stream_id}/notes", responses={401: {}, 403: {}, 404: {}})
def get_notes(limit: int = Query(20, ge=1, le=200), access: Access = Depends(require("read")),
              gw: Gateway = Depends(gateway)) -> dict[str, Any]:
    """The latest notes and summaries, newest first: ``final`` (the meeting notes, once the
    stream ended), ``rolling`` summaries, on-demand summaries and ``answers``; and
    ``last_event_id``, where a follower's ``/events`` picks up. Needs ``read``."""
    _known(gw, access.stream_id)
    raw = latest_outputs(gw.client, access.stream_id, count=max(200, limit))
    groups: dict[str, list[dict[str, Any]]] = {"rolling": [], "on_demand": [], "answer": []}
    final: dict[str, Any] | None = None
    for entry_id, fields in reversed(raw):
        kind = fields.get("kind", "")
        if kind == "final" and final is None:
            final = output_view(gw.client, access.stream_id, entry_id, fields)
        elif kind in groups and len(groups[kind]) < limit:
            groups[kind].append(output_view(gw.client, access.stream_id, entry_id, fields))
    return {"stream": access.stream_id, "last_event_id": raw[-1][0] if raw else "0-0",
            "final": final, "rolling": groups["rolling"], "on_demand": groups["on_demand"],
            "answers": groups["answer"]}


async def _wait_answer(sub: Subscriber, request: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = await asyncio.wait_for(sub.next(), left)
        except asyncio.TimeoutError:
            return None
        if event is None:
            return None
        if event.request == request:
            answer: dict[str, Any] = json.loads(event.data)
            return answer
    return None


@router.post("/v1/streams/{stream_id}/ask", responses={
    202: {"description": "sent; the answer arrives as an 'answer' event"},
    401: {}, 403: {}, 404: {}, 409: {}, 504: {}})
async def ask(body: AskIn, access: Access = Depends(require("ask")),
              gw: Gateway = Depends(gateway)) -> Any:
    """Ask a question about the stream; answered from its committed state and memory, with
    the sources it rests on. Needs ``ask``."""
    exists = await run_in_threadpool(gw.client.exists, StreamKeys.of(access.stream_id).state)
    if not exists:
        raise HTTPException(409, f"stream {access.stream_id!r} has no committed state yet: "
                                 "publish to it and let a worker apply it first")
    request = secrets.token_hex(8)
    sub = await gw.hub.subscribe(access.stream_id) if body.wait else None
    try:
        cfg = gw.settings
        await run_in_threadpool(lambda: gw.celery().send_task(
            SUMMARIZE, args=[access.stream_id, request, body.question], queue=cfg.broker_queue))
        if sub is None:
            return JSONResponse({"request": request, "stream": access.stream_id}, 202)
        timeout = body.timeout or cfg.gateway_ask_timeout_seconds
        answer = await _wait_answer(sub, request, timeout)
    finally:
        if sub is not None:
            gw.hub.unsubscribe(sub)
    if answer is None:
        raise HTTPException(504, f"no answer within {timeout:.0f}s (request {request}): is a "
                                 "worker running? The answer still arrives on /events if one "
                                 "comes")
    return answer


@router.post("/v1/session", status_code=204, responses={401: {}}, tags=["page"])
def session(body: SessionIn, request: Request, response: Response,
            gw: Gateway = Depends(gateway)) -> None:
    """Trade a token for an HttpOnly, SameSite=Strict cookie: how the live page follows a
    stream with ``EventSource``, which cannot send an Authorization header."""
    if gw.tokens.lookup(body.token) is None:
        raise HTTPException(401, "unknown or revoked token")
    response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https",
                        path="/", max_age=12 * 3600)


@router.delete("/v1/session", status_code=204, tags=["page"])
def end_session(response: Response) -> None:
    """Forget the page's cookie."""
    response.delete_cookie(COOKIE, path="/")


@router.get("/v1/whoami", responses={401: {}}, tags=["page"])
def whoami(who: Principal = Depends(principal)) -> dict[str, Any]:
    """The caller's token id, name, scopes and prefixes (never the token)."""
    return {"id": who.token_id, "name": who.name, "scopes": sorted(who.scopes),
            "prefixes": list(who.prefixes)}
