"""``sinkstream --help`` reads well: every command listed with a one-line summary."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
import typer.main

from sinkstream.cli.app import app


def _commands(group: click.Command, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in getattr(group, "commands", {}).items():
        yield prefix + name, command
        yield from _commands(command, f"{prefix}{name} ")


COMMANDS = dict(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_one_line_summary(name: str) -> None:
    """The summary is what a command list shows: its first paragraph. Rich keeps the
    paragraph's line breaks, so a summary wrapped in the docstring is listed broken."""
    summary = (COMMANDS[name].help or "").strip().split("\n\n")[0]
    assert summary, f"{name} has no help"
    assert "\n" not in summary, f"{name}'s summary runs over lines: {summary!r}"
    assert len(summary) <= 100, f"{name}'s summary is {len(summary)} characters"


def test_the_command_list_shows_every_summary_on_its_own_row() -> None:
    from typer.testing import CliRunner

    shown = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    for name, command in COMMANDS.items():
        if " " not in name:
            summary = (command.help or "").strip().split("\n\n")[0]
            assert summary in shown.output, name
