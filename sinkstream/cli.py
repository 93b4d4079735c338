"""The ``sinkstream`` command line: one entry point for producers, workers and operators."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sinkstream.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="sinkstream",
    help="Keep a language model listening to live text streams and summarizing them.\n\n"
    "Settings come from SINKSTREAM_* environment variables and an optional TOML file "
    "(--config or SINKSTREAM_CONFIG).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)


class _State:
    config: Path | None = None
    settings: Settings | None = None


_state = _State()


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file", envvar="SINKSTREAM_CONFIG"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    _state.config = config
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def settings(**overrides: object) -> Settings:
    """Settings for this invocation; exits with a readable message when they are invalid."""
    if _state.settings is None or overrides:
        try:
            loaded = load_settings(_state.config, **overrides)
        except SettingsError as exc:
            err_console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        if overrides:
            return loaded
        _state.settings = loaded
    return _state.settings


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an actionable error and return the Exit to raise."""
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
