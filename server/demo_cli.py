"""``sarcofed demo ...``: synthetic demo hospitals."""

from __future__ import annotations

import typer

demo_app = typer.Typer(help="Synthetic demo hospitals (no real patient data).", no_args_is_help=True)
