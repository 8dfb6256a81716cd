"""The ``sarcofed`` command: site, demo and study sub-commands."""

from __future__ import annotations

import logging

import typer

from client.cli import site_app
from server.demo_cli import demo_app

app = typer.Typer(
    name="sarcofed",
    help=(
        "Federated training and external validation of CT L3 body-composition models. "
        "No image leaves a hospital: only weights and aggregate metrics do."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(site_app, name="site")
app.add_typer(demo_app, name="demo")


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
