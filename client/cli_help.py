"""How every ``sarcofed`` command's help reads: one owner for docstring and option-help tidying.

Typer renders help with rich, and in its default ("rich") markup mode it keeps the hard line
breaks of a docstring's later paragraphs, so a docstring wrapped at 100 columns prints as
ragged half-lines in an 80-column terminal; rich markup in help text would also eat anything
in square brackets (``[labels]``), and click 8.2 prints ``(env var: 'None')`` in the usage
error of every typer option. :class:`SarcofedGroup` (the root ``sarcofed`` app and the client's
sub-apps are made with it, see :func:`sarcofed_typer`) fixes all three for itself and every
command under it when the click command tree is built: each paragraph is joined into one line
for rich to wrap (:func:`unwrap`), help text is markup-escaped, and options without an
environment variable do not claim one.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

#: A line that starts a list item keeps its own line when a paragraph is joined.
_LIST_ITEM = re.compile(r"^(?:[-*]|\d+[.)])\s")


def unwrap(text: str) -> str:
    """``text`` (a docstring) with each paragraph's lines joined: rich wraps to the terminal.

    Paragraphs stay separated by a blank line; list items (``- x``, ``1. x``) and click's
    ``\\b`` no-rewrap paragraphs keep their line breaks; anything after click's ``\\f`` is
    dropped, as click does.
    """
    paragraphs = inspect.cleandoc(text).partition("\f")[0].split("\n\n")
    out = []
    for paragraph in paragraphs:
        if paragraph.startswith("\b"):
            out.append(paragraph)
            continue
        lines: list[str] = []
        for line in paragraph.splitlines():
            line = line.strip()
            if lines and line and not _LIST_ITEM.match(line):
                lines[-1] = f"{lines[-1]} {line}"
            elif line:
                lines.append(line)
        out.append("\n".join(lines))
    return "\n\n".join(p for p in out if p)


def tidy_command(command: click.Command) -> None:
    """Unwrap and markup-escape ``command``'s help and its parameters' help, once."""
    if getattr(command, "_sarcofed_tidy", False):
        return
    if command.help:
        command.help = escape(unwrap(command.help))
    if command.short_help:
        command.short_help = escape(unwrap(command.short_help))
    for param in command.params:
        help_text = getattr(param, "help", None)
        if help_text:
            param.help = escape(unwrap(help_text))  # type: ignore[attr-defined]
        if isinstance(param, click.Option) and param.envvar is None:
            param.show_envvar = False  # else click 8.2 says "(env var: 'None')" in errors
    command._sarcofed_tidy = True  # type: ignore[attr-defined]


class SarcofedGroup(TyperGroup):
    """A typer group whose own help and whose commands' help is tidied (:func:`tidy_command`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_tree(self)


def _tidy_tree(command: click.Command) -> None:
    """:func:`tidy_command` on ``command`` and everything under it (sub-groups built by plain
    ``typer.Typer`` apps, e.g. ``server.study_cli``'s, are tidied by the group above them)."""
    tidy_command(command)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _tidy_tree(sub)


def sarcofed_typer(**kwargs: Any) -> typer.Typer:
    """A ``typer.Typer`` whose help reads well at any width (:class:`SarcofedGroup`)."""
    return typer.Typer(cls=SarcofedGroup, **kwargs)
