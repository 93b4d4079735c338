"""ASGI middleware around every request: a body-size limit, metrics, and safe headers.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which buffers streaming
responses and would hold every SSE event back.

* **Body limit.** A ``Content-Length`` over ``gateway_max_body_bytes`` is refused with 413
  before a byte is read; a chunked body is counted as it arrives and refused the same way
  once it passes the limit, so no request can make the gateway buffer more than that.
* **Metrics.** Requests are counted by method, *route template* and status; latencies go to a
  histogram, except for SSE streams, whose "latency" is how long someone followed a meeting.
* **Headers.** ``nosniff``, no referrer, and ``no-store`` on the API: notes and transcripts
  do not belong in shared caches.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitoring import gateway_metrics as m

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body is over the limit of {limit} bytes "
                                 "(SINKSTREAM_GATEWAY_MAX_BODY_BYTES): send smaller "
                                 "batches"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over once, then waits on the real one
    (for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_413(send, self.max_body_bytes)
            m.REQUESTS.labels(scope["method"], "other", "413").inc()
            return
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500}
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(receive)
            if body is None:
                await _send_413(send, self.max_body_bytes)
                self._observe(scope, 413, time.perf_counter() - started)
                return
            receive = _replay(body, receive)

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                extra = list(_SECURITY_HEADERS)
                if scope["path"].startswith("/v1/"):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self._observe(scope, state["status"], time.perf_counter() - started)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit (read no further)."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts)

    @staticmethod
    def _observe(scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "other"
        method = scope["method"]
        m.REQUESTS.labels(method, route, str(status)).inc()
        if not route.endswith("/events"):
            m.REQUEST_SECONDS.labels(method, route).observe(seconds)
