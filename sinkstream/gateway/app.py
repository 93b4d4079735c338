"""The gateway's ASGI app: ``create_app(settings)`` builds it (FastAPI, served by uvicorn in
``sinkstream serve``; any ASGI server can run the factory).

Closed by default: every ``/v1`` route needs a bearer token (``access.py``), CORS is off
unless ``gateway_cors_origins`` names origins, and ``sinkstream serve`` binds 127.0.0.1.
``/healthz``, ``/readyz`` and ``/metrics`` carry no stream data and answer without a token,
for probes and Prometheus; the live page's HTML and script carry none either (the page
signs in before it reads anything).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.concurrency import run_in_threadpool

from sinkstream.gateway import events, publishing, reading
from sinkstream.gateway.auth import TokenFileError, TokenStore
from sinkstream.gateway.context import Gateway
from sinkstream.gateway.observe import GatewayMiddleware
from sinkstream.ids import InvalidStreamId, validate_stream_id
from sinkstream.settings import Settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: the live page runs only its own script and styles, talks only to this origin
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def _lifespan(gw: Gateway) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw.hub.start()
        yield
        gw.close()

    return lifespan


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with one readable line per problem ('body.entries.3.text: Field required')."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    lines = [".".join(str(p) for p in err.get("loc", ())) + ": " + str(err.get("msg", ""))
             for err in errors]
    return JSONResponse({"detail": "; ".join(lines) or "invalid request",
                         "errors": [{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                                    for e in errors]}, 422)


def create_app(settings: Settings, tokens: TokenStore | None = None) -> FastAPI:
    """The gateway app for ``settings``; TokenFileError when no tokens file is configured
    (no anonymous access) or it is unreadable."""
    if tokens is None:
        if settings.gateway_tokens_file is None:
            raise TokenFileError("no tokens file: set SINKSTREAM_GATEWAY_TOKENS_FILE (create "
                                 "one with `sinkstream token create`); the gateway never "
                                 "serves anonymous requests")
        tokens = TokenStore(settings.gateway_tokens_file)
    gw = Gateway.build(settings, tokens)
    app = FastAPI(title="sinkstream gateway", version="1",
                  description="Publish live text over HTTP, follow summaries, notes and "
                              "answers as Server-Sent Events. See docs/http.md.",
                  lifespan=_lifespan(gw))
    app.state.gateway = gw
    app.add_exception_handler(RequestValidationError, _validation_error)
    if settings.gateway_cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.gateway_cors_origins,
                           allow_methods=["GET", "POST"], allow_credentials=False,
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key",
                                          "Last-Event-ID"])
    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.gateway_max_body_bytes)
    for router in (publishing.router, reading.router, events.router):
        app.include_router(router)
    _add_service_routes(app, gw)
    _add_page(app)
    return app


def _add_service_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """The process answers (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"], responses={503: {}})
    async def readyz() -> JSONResponse:
        """Redis answers and the SSE reader runs (readiness)."""
        try:
            await run_in_threadpool(gw.client.ping)
        except redis.RedisError as exc:
            return JSONResponse({"status": "unavailable", "redis": str(exc)}, 503)
        if not gw.hub.healthy():
            return JSONResponse({"status": "unavailable", "sse_reader": "stalled"}, 503)
        return JSONResponse({"status": "ok", "sse_clients": gw.hub.subscribers,
                             "tokens": len(gw.tokens)})

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics: requests, latencies, open SSE clients, the process."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _add_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/streams/{stream_id}", tags=["page"], response_class=FileResponse)
    def page(stream_id: str) -> FileResponse:
        """The live notes page of one stream (plain HTML and a small script, no build)."""
        try:
            validate_stream_id(stream_id)
        except InvalidStreamId as exc:
            raise HTTPException(404, str(exc)) from None
        return FileResponse(STATIC / "notes.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP,
                                     "Cache-Control": "no-cache"})
