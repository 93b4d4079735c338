"""A real gateway process (``python -m sinkstream serve``) on a free loopback port, with a
tokens file of its own, in front of a private redis-server; shared by the gateway tests and
the gateway benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sinkstream.cli.localredis import free_port
from sinkstream.gateway.auth import create_token

ROOT = Path(__file__).resolve().parents[3]


def gateway_env(redis_url: str, tokens: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINKSTREAM_")}
    env.update({
        "SINKSTREAM_REDIS_URL": redis_url,
        "SINKSTREAM_BROKER_URL": redis_url,
        "SINKSTREAM_GATEWAY_TOKENS_FILE": str(tokens),
        "SINKSTREAM_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@dataclass
class GatewayProcess:
    """``start()`` / ``stop()`` / ``kill()`` / ``restart()`` the same gateway (same port)."""

    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "serve", "--port", str(self.port),
             "--log-level", "warning"],
            env=self.env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready within {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no graceful close of any connection."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class Tokens:
    """A tokens file with an operator token and two tenants' tokens."""

    path: Path
    admin: str = ""
    acme: str = ""
    acme_read: str = ""
    globex: str = ""

    @classmethod
    def create(cls, path: Path) -> Tokens:
        tokens = cls(path)
        tokens.admin = create_token(path, "admin", ["publish", "read", "ask"], ["*"])
        tokens.acme = create_token(path, "acme", ["publish", "read", "ask"], ["acme-"])
        tokens.acme_read = create_token(path, "acme-viewer", ["read"], ["acme-"])
        tokens.globex = create_token(path, "globex", ["publish", "read", "ask"], ["globex-"])
        return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
