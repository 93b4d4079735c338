"""The ``sinkstream`` command: every subcommand, registered in one place.

The roof of the house: this package imports from every floor below and nothing imports it
(import-linter holds that). Each command module keeps its heavy imports inside the commands,
so ``sinkstream --help`` starts in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from sinkstream.cli import demo, gateway, logs, models, publishing, reading, repair, services
from sinkstream.cli.common import state

app = typer.Typer(
    name="sinkstream",
    help="Keep a language model listening to live text streams and summarizing them.\n\n"
    "Settings come from SINKSTREAM_* environment variables and an optional TOML file "
    "(--config or SINKSTREAM_CONFIG).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML settings file", envvar="SINKSTREAM_CONFIG"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    state.config = config
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# producing
app.command("publish")(publishing.publish_cmd)
app.command("streams")(publishing.streams_cmd)
# reading what workers publish
app.command("follow")(reading.follow_cmd)
app.command("summarize")(reading.summarize_cmd)
app.command("ask")(reading.ask_cmd)
app.command("status")(reading.status_cmd)
app.command("resume")(repair.resume_cmd)
app.command("logs")(logs.logs_cmd)
# processes
app.command("worker")(services.worker_cmd)
app.command("exporter")(services.exporter_cmd)
app.command("demo")(demo.demo_cmd)
app.add_typer(models.model_app, name="model")
# the HTTP gateway
app.command("serve")(gateway.serve_cmd)
app.add_typer(gateway.token_app, name="token")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
