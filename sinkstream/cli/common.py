"""What every command shares: the console, this invocation's settings, and clear errors."""

from __future__ import annotations

from pathlib import Path

import redis
import typer
from rich.console import Console
from rich.markup import escape

from sinkstream.contracts.keys import StreamKeys
from sinkstream.ids import InvalidStreamId
from sinkstream.settings import Settings, SettingsError, load_settings

console = Console()
err_console = Console(stderr=True)


class _State:
    config: Path | None = None
    settings: Settings | None = None


state = _State()


def settings(**overrides: object) -> Settings:
    """Settings for this invocation; exits with a readable message when they are invalid."""
    if state.settings is None or overrides:
        try:
            loaded = load_settings(state.config, **overrides)
        except SettingsError as exc:
            err_console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        if overrides:
            return loaded
        state.settings = loaded
    return state.settings


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an actionable error and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def connect_redis(cfg: Settings) -> redis.Redis:
    """A pinged client for the data Redis, or a clear message naming the URL and the fix."""
    from state_store.connection import describe_redis_error, redis_from_settings

    client = redis_from_settings(cfg, client_name="sinkstream-cli")
    try:
        client.ping()
    except redis.RedisError as exc:
        raise fail(escape(describe_redis_error(cfg.redis_url, exc))) from None
    return client


def stream_keys(stream: str) -> StreamKeys:
    """The keys of ``stream``, or exit with the reason its id is invalid."""
    try:
        return StreamKeys.of(stream)
    except InvalidStreamId as exc:
        raise fail(escape(str(exc)), 2) from None
