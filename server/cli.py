"""The ``sarcofed`` command: site, demo and study sub-commands."""

from __future__ import annotations

import logging

from client import site_init_cli, site_ops_cli, tasks_cli
from client.cli import site_app
from client.cli_help import sarcofed_typer
from client.demo_cli import demo_app
from client.workbench.cli import register as register_workbench
from server import study_cli
from server.demo_study import demo_study_cmd

app = sarcofed_typer(
    name="sarcofed",
    help=(
        "Federated training and external validation of CT L3 body-composition models. "
        "No image leaves a hospital: only weights and aggregate metrics do."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
tasks_cli.register(site_app)
register_workbench(site_app)
site_ops_cli.register(site_app)
site_init_cli.register(site_app)
study_app = sarcofed_typer(help="Commands a study coordinator runs.", no_args_is_help=True)
study_app.command("demo")(demo_study_cmd)
study_cli.register(study_app)
app.add_typer(site_app, name="site")
app.add_typer(demo_app, name="demo")
app.add_typer(study_app, name="study")


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
