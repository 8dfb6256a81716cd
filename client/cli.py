"""``sarcofed site ...``: what a hospital runs next to its own data."""

from __future__ import annotations

import typer

site_app = typer.Typer(
    help="Commands a hospital runs next to its private data (nothing here sends anything).",
    no_args_is_help=True,
)
