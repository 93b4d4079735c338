"""Who is asking and whether they may: the FastAPI dependencies every route declares.

Checks run in a fixed order so the status says what is wrong: no or unknown token, 401;
an invalid stream id, 422; a scope the token lacks, or a stream outside its prefixes, 403.

Browsers cannot put an ``Authorization`` header on an ``EventSource``, so the live page
trades its token once (``POST /v1/session``) for an ``HttpOnly``, ``SameSite=Strict``
cookie holding it. A request authenticated by that cookie that changes something (POST)
must also come from this origin (``Origin`` header), so another site cannot make a
signed-in browser publish or ask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Path, Request

from monitoring import gateway_metrics as m
from sinkstream.gateway.auth import Principal
from sinkstream.gateway.context import Gateway
from sinkstream.ids import InvalidStreamId, validate_stream_id

COOKIE = "sinkstream_token"
STREAM_ID = Path(description="stream id: 1-128 of [A-Za-z0-9._-], starting with a letter or "
                             "digit")


@dataclass(frozen=True)
class Access:
    principal: Principal
    stream_id: str


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _refuse(status: int, reason: str, detail: str) -> HTTPException:
    m.AUTH_FAILURES.labels(reason).inc()
    headers = {"WWW-Authenticate": 'Bearer realm="sinkstream"'} if status == 401 else None
    return HTTPException(status, detail, headers=headers)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def principal(request: Request) -> Principal:
    """The caller's token (header, else the page's cookie); 401 without a valid one."""
    header = request.headers.get("authorization", "")
    token = ""
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _refuse(401, "invalid", "Authorization must be 'Bearer <token>'")
        token = value.strip()
    elif cookie := request.cookies.get(COOKIE):
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            raise _refuse(403, "origin", "cross-site request with a session cookie refused")
        token = cookie
    if not token:
        raise _refuse(401, "missing", "a bearer token is required: Authorization: Bearer <token>")
    found = gateway(request).tokens.lookup(token)
    if found is None:
        raise _refuse(401, "invalid", "unknown or revoked token")
    return found


def require(scope: str) -> Callable[[Request, str], Access]:
    """A dependency: the caller may use ``scope`` on the path's ``{stream_id}``."""

    def check(request: Request, stream_id: str = STREAM_ID) -> Access:
        who = principal(request)
        try:
            validate_stream_id(stream_id)
        except InvalidStreamId as exc:
            raise HTTPException(422, str(exc)) from None
        if scope not in who.scopes:
            raise _refuse(403, "scope", f"token {who.token_id!r} lacks the {scope!r} scope")
        if not who.covers(stream_id):
            raise _refuse(403, "tenant", f"token {who.token_id!r} may not use stream "
                                         f"{stream_id!r} (allowed prefixes: "
                                         f"{', '.join(who.prefixes)})")
        return Access(who, stream_id)

    check.__name__ = f"require_{scope}"
    return check


def require_scope(scope: str) -> Callable[[Request], Principal]:
    """A dependency for routes without a stream: the caller's token has ``scope``."""

    def check(request: Request) -> Principal:
        who = principal(request)
        if scope not in who.scopes:
            raise _refuse(403, "scope", f"token {who.token_id!r} lacks the {scope!r} scope")
        return who

    return check
