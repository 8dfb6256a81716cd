"""Every command's help reads at 80 columns (``client.cli_help``): paragraphs wrap as paragraphs,
nothing is cut off with an ellipsis, and square brackets in help text survive rich markup."""

from __future__ import annotations

import itertools

import click
import pytest
import typer
from typer.testing import CliRunner

from client.cli_help import sarcofed_typer, unwrap
from server.cli import app

WIDTH = 80
ENV = {"COLUMNS": str(WIDTH)}


def _command_paths() -> list[list[str]]:
    """Every command and group of ``sarcofed``, as the words that name it (the root is [])."""
    paths: list[list[str]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        paths.append(path)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def _description(help_output: str) -> list[list[str]]:
    """The help's prose (between the usage line and the first box), as paragraphs of lines."""
    prose = help_output.split("╭─")[0].splitlines()
    start = next(i for i, line in enumerate(prose) if line.strip().startswith("Usage:")) + 1
    paragraphs: list[list[str]] = [[]]
    for line in prose[start:]:
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


@pytest.mark.parametrize("words", _command_paths(), ids=lambda p: " ".join(p) or "sarcofed")
def test_help_fits_80_columns_and_wraps_paragraphs(words: list[str]) -> None:
    result = CliRunner().invoke(app, [*words, "--help"], env=ENV, terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert "…" not in result.output  # an option table column cut short
    for paragraph in _description(result.output):
        # a line that ends early inside a paragraph is a docstring's hard line break ("manifest are")
        for line, after in itertools.pairwise(paragraph):
            room = WIDTH - 2 - len(line)
            assert room <= len(after.split()[0]) + 1, f"ragged paragraph: {line!r} / {after!r}"


def test_unwrap_joins_paragraph_lines_and_keeps_list_items() -> None:
    doc = """First line.

        A paragraph
        on two lines.

        - item one
          continued
        - item two
        \f
        hidden
        """
    assert unwrap(doc) == "First line.\n\nA paragraph on two lines.\n\n- item one continued\n- item two"


def test_brackets_in_help_are_printed_verbatim() -> None:
    small = sarcofed_typer()

    @small.command()
    def fix(
        value: int = typer.Option(0, help="Add the value to [labels] in site.toml."),
    ) -> None:
        """Map mask values.

        Each value goes into the [labels] table; [bold]not markup[/bold].
        """

    @small.command()
    def other() -> None:
        """Keep the group a group."""

    result = CliRunner().invoke(small, ["fix", "--help"], env=ENV, terminal_width=WIDTH)
    text = " ".join(result.output.split())
    assert "Each value goes into the [labels] table; [bold]not markup[/bold]." in text
    assert "Add the value to [labels] in site.toml." in text


def test_a_bad_option_value_names_no_environment_variable() -> None:
    result = CliRunner().invoke(
        app, ["site", "compare", ".", "--cutoff-set", "nope"], env=ENV, terminal_width=WIDTH
    )
    assert result.exit_code == 2
    assert "env var" not in result.output
