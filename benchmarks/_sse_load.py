"""SSE followers for the gateway benchmark: many raw asyncio connections in one process.

Raw sockets rather than an HTTP client library, so a thousand followers cost the client
machine little and the numbers measure the gateway. Each follower reconnects after any
error with the last id it saw as ``Last-Event-ID`` (as a browser does), records every event
id it receives and the time from the event's commit (its ``ts``) to arrival, and stops once
it has the number of events its stream will get, or at the deadline.

``python -m benchmarks._sse_load CONFIG_JSON OUT_JSON`` (run by ``benchmarks/gateway.py``).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

_TS = re.compile(rb'"ts":([0-9.]+)')


async def _chunks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The response body as it arrives (HTTP/1.1 chunked transfer coding, or raw)."""
    while True:
        if not chunked:
            data = await reader.read(65536)
            if not data:
                return
            yield data
            continue
        line = await reader.readline()
        if not line:
            return
        size = int(line.strip().split(b";")[0] or b"0", 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


class Follower:
    def __init__(self, host: str, port: int, stream: str, token: str, expect: int) -> None:
        self.host, self.port, self.stream, self.token = host, port, stream, token
        self.expect = expect
        self.ids: list[str] = []
        self.latencies: list[float] = []
        self.reconnects = 0
        self.last: str | None = None

    def _request(self) -> bytes:
        lines = [f"GET /v1/streams/{self.stream}/events HTTP/1.1",
                 f"Host: {self.host}:{self.port}", f"Authorization: Bearer {self.token}",
                 "Accept: text/event-stream"]
        if self.last:
            lines.append(f"Last-Event-ID: {self.last}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _event(self, block: bytes) -> None:
        event_id = None
        for line in block.split(b"\n"):
            line = line.rstrip(b"\r")
            if line.startswith(b"id:"):
                event_id = line[3:].strip().decode()
            elif line.startswith(b"data:") and event_id is not None:
                match = _TS.search(line)
                if match:
                    self.latencies.append(time.time() - float(match.group(1)))
        if event_id is not None:
            self.ids.append(event_id)
            self.last = event_id

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self._request())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head[:80].decode(errors="replace"))
            chunked = b"transfer-encoding: chunked" in head.lower()
            buffer = b""
            async for data in _chunks(reader, chunked):
                buffer += data.replace(b"\r\n", b"\n")
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._event(block)
                if len(self.ids) >= self.expect:
                    return
        finally:
            writer.close()

    async def run(self, deadline: float) -> None:
        while len(self.ids) < self.expect and time.time() < deadline:
            try:
                await asyncio.wait_for(self._session(), max(0.1, deadline - time.time()))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError, asyncio.TimeoutError, ValueError):
                pass
            if len(self.ids) < self.expect:
                self.reconnects += 1
                await asyncio.sleep(0.2 + random.random() * 0.3)  # noqa: S311 (jitter)


async def _main(config: dict[str, Any]) -> list[dict[str, Any]]:
    followers = [Follower(config["host"], config["port"], stream, config["token"],
                          config["expect"]) for stream in config["streams"]]
    deadline = time.time() + config["seconds"]
    tasks = []
    for follower in followers:
        tasks.append(asyncio.create_task(follower.run(deadline)))
        await asyncio.sleep(config.get("ramp_s", 0.001))
    await asyncio.gather(*tasks)
    return [{"stream": f.stream, "ids": f.ids, "latencies": f.latencies,
             "reconnects": f.reconnects} for f in followers]


if __name__ == "__main__":
    cfg = json.loads(open(sys.argv[1]).read())
    result = asyncio.run(_main(cfg))
    with open(sys.argv[2], "w") as out:
        json.dump(result, out)
