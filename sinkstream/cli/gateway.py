"""``sinkstream serve`` (the HTTP gateway) and ``sinkstream token`` (its bearer tokens)."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Annotated

import typer

from sinkstream.cli.common import console, err_console, fail, settings

token_app = typer.Typer(help="Bearer tokens of the HTTP gateway (stored hashed).",
                        no_args_is_help=True)


def _tokens_file(path: Path | None) -> Path:
    chosen = path or settings().gateway_tokens_file
    if chosen is None:
        raise fail("name the tokens file: --file PATH or SINKSTREAM_GATEWAY_TOKENS_FILE", 2)
    return chosen


def _raise_fd_limit() -> None:
    """One descriptor per SSE follower: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_cmd(
    host: Annotated[str | None, typer.Option(help="bind address (default: "
                                             "SINKSTREAM_GATEWAY_HOST, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: SINKSTREAM_GATEWAY_PORT, "
                                             "8080)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the HTTP gateway: entries in, notes out, questions, a live notes page.

    POST entries and captions, follow notes as Server-Sent Events, ask questions, and read
    the live notes page at /streams/ID (docs/http.md)."""
    import uvicorn

    from sinkstream.gateway.app import create_app
    from sinkstream.gateway.auth import TokenFileError

    cfg = settings()
    try:
        app = create_app(cfg)
    except TokenFileError as exc:
        raise fail(str(exc), 2) from None
    _raise_fd_limit()
    bind, bind_port = host or cfg.gateway_host, cfg.gateway_port if port is None else port
    console.print(f"gateway: http://{bind}:{bind_port}  (OpenAPI: /docs, page: /streams/ID)")
    uvicorn.run(app, host=bind, port=bind_port, log_level=log_level, access_log=False,
                proxy_headers=False, server_header=False, timeout_graceful_shutdown=5)


def token_create_cmd(
    name: Annotated[str, typer.Option(help="who or what uses it (shown in logs)")],
    scope: Annotated[list[str], typer.Option(
        "--scope", "-s", help="publish, read or ask (repeat for several)")],
    prefix: Annotated[list[str], typer.Option(
        "--prefix", "-p", help="stream-id prefix it may use, e.g. 'acme-' (repeat for "
                               "several); '*' for every stream")],
    file: Annotated[Path | None, typer.Option("--file", "-f", help="tokens file")] = None,
) -> None:
    """Create a token and print it ONCE: the file keeps only its SHA-256."""
    from sinkstream.gateway.auth import SCOPES, TokenFileError, create_token

    if bad := [s for s in scope if s not in SCOPES]:
        raise fail(f"unknown scope {bad[0]!r}: use {', '.join(SCOPES)}", 2)
    for p in prefix:
        if p != "*" and p[-1:] not in "-._":
            console.print(f"[yellow]warning:[/yellow] prefix {p!r} does not end in '-', '.' "
                          f"or '_': it also covers streams like {p + 'x'!r}", highlight=False)
    path = _tokens_file(file)
    try:
        token = create_token(path, name, scope, prefix)
    except (TokenFileError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    typer.echo(token)
    err_console.print(f"[dim]stored as a SHA-256 in {path}; this is the only time the token "
                      "is shown[/dim]", highlight=False)


def token_list_cmd(
    file: Annotated[Path | None, typer.Option("--file", "-f", help="tokens file")] = None,
) -> None:
    """List tokens: id, name, scopes, prefixes (never the tokens themselves)."""
    import json

    path = _tokens_file(file)
    for entry in json.loads(path.read_text()).get("tokens", []):
        typer.echo(f"{entry['id']}  {entry.get('name', '')}  scopes={','.join(entry['scopes'])}"
                   f"  prefixes={','.join(entry['prefixes'])}")


def token_revoke_cmd(
    token_id: Annotated[str, typer.Argument(help="the token's id (see `token list`)")],
    file: Annotated[Path | None, typer.Option("--file", "-f", help="tokens file")] = None,
) -> None:
    """Revoke a token: a running gateway stops accepting it within a second or two."""
    from sinkstream.gateway.auth import revoke_token

    if not revoke_token(_tokens_file(file), token_id):
        raise fail(f"no token with id {token_id!r}")
    typer.echo(f"revoked {token_id}")


token_app.command("create")(token_create_cmd)
token_app.command("list")(token_list_cmd)
token_app.command("revoke")(token_revoke_cmd)
