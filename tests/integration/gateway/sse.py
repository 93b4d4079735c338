"""A small Server-Sent Events reader over httpx, for the tests."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Received:
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: int = 0


def read_events(url: str, headers: dict[str, str], count: int, timeout: float = 10.0,
                comments: int = 0) -> Received:
    """Read until ``count`` events and ``comments`` heartbeat comments arrived."""
    got = Received()
    deadline = time.monotonic() + timeout
    event: dict[str, Any] = {}
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                got.comments += 1
            elif line.startswith("id:"):
                event["id"] = line[3:].strip()
            elif line.startswith("event:"):
                event["event"] = line[6:].strip()
            elif line.startswith("data:"):
                event["data"] = json.loads(line[5:].strip())
            elif not line and "data" in event:
                got.events.append(event)
                event = {}
            if (len(got.events) >= count and got.comments >= comments) or \
                    time.monotonic() > deadline:
                break
    return got
