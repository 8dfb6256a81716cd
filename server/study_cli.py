"""``sarcofed study ...``: what a coordinator runs to deploy a study on Flower's engine.

certs -> superlink -> connect -> register (one per site) -> run. ``run`` reports the
run's *final* status from ``flwr ls`` and exits 1 unless it is ``finished:completed``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import NoReturn, cast

import typer
from rich.console import Console
from rich.markup import escape

from common.errors import SarcofedError
from common.paths import sarcofed_home
from protocols.study import Scalar
from server.deploy import (
    FLOWER_ENV,
    CoordinatorLog,
    DeploymentError,
    StudyCerts,
    make_study_certs,
    register_supernode,
    run_status,
    run_study,
    superlink_command,
    write_connection,
)

study_app = typer.Typer(
    help="Coordinator commands for a real multi-site study on Flower's deployment engine.",
    no_args_is_help=True,
)
CONNECTION = typer.Option(
    "study", "--connection", "-c", help="SuperLink connection name in $FLWR_HOME/config.toml."
)


def coordinator_log() -> CoordinatorLog:
    return CoordinatorLog(sarcofed_home() / "coordinator.jsonl")


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]{escape(message)}[/red]")
    raise typer.Exit(1)


@study_app.command("certs")
def certs(
    out: Path = typer.Argument(..., help="Folder for ca.crt, ca.key, server.pem, server.key."),
    host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"],
        "--host",
        help="Every name/IP sites or the proxy use to reach the SuperLink.",
    ),
    days: int = typer.Option(365, "--days"),
    force: bool = typer.Option(False, "--force", help="Replace an existing study CA."),
) -> None:
    """Make the study CA and the SuperLink's TLS certificate. Give sites ca.crt only."""
    try:
        made = make_study_certs(out, host, days=days, overwrite=force)
    except FileExistsError as err:
        _fail(str(err))
    typer.echo(f"send to every site: {made.ca_cert}\nkeep here: {made.ca_key}, {made.server_key}")


@study_app.command("superlink")
def superlink(
    certs_dir: Path = typer.Option(..., "--certs", help="Folder from `sarcofed study certs`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (keep 127.0.0.1 behind the proxy)."),
    port: int = typer.Option(9093, "--port"),
    database: Path | None = typer.Option(None, "--database", help="State file: runs survive a restart."),
    run: bool = typer.Option(False, "--run", help="Start it now instead of printing the command."),
) -> None:
    """Print (or run) flower-superlink with TLS, SuperNode auth, dependency install off."""
    d = Path(certs_dir)
    cmd = superlink_command(
        StudyCerts(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key"),
        host=host,
        port=port,
        database=database,
    )
    if not run:
        typer.echo(" ".join(f"{k}={v}" for k, v in FLOWER_ENV.items()) + " " + shlex.join(cmd))
        return
    exe = shutil.which(cmd[0])
    if exe is None:
        _fail(f"{cmd[0]} not found on PATH")
    os.execve(exe, cmd, os.environ | FLOWER_ENV)


@study_app.command("connect")
def connect(
    address: str = typer.Argument(..., help="host:port of the SuperLink (the coordinator's own machine)."),
    ca: Path = typer.Option(..., "--ca", help="The study CA certificate (ca.crt)."),
    name: str = CONNECTION,
) -> None:
    """Write the SuperLink connection to $FLWR_HOME/config.toml (used by flwr run/ls/supernode)."""
    typer.echo(f"wrote {write_connection(name, address, ca)}")


@study_app.command("register")
def register_site(
    public_key: Path = typer.Argument(..., help="The site's supernode_ec384.pub."),
    site: str = typer.Option(..., "--site", help="Which hospital this key belongs to (for your log)."),
    name: str = CONNECTION,
) -> None:
    """Register a site's public key with the SuperLink (flwr supernode register)."""
    try:
        answer = register_supernode(public_key, name)
    except DeploymentError as err:
        _fail(str(err))
    coordinator_log().append("supernode-registered", site=site, public_key=str(public_key), answer=answer)
    typer.echo(json.dumps(answer))


@study_app.command("run")
def run(
    app_dir: Path = typer.Argument(Path("."), help="The sarcofed app (folder with pyproject.toml)."),
    name: str = CONNECTION,
    config: list[str] = typer.Option(
        [], "--config", help="Run-config override KEY=VALUE (TOML value), repeatable."
    ),
    timeout: float = typer.Option(24 * 3600.0, "--timeout", help="Seconds to wait for the run to finish."),
) -> None:
    """flwr run, then wait for the final status (flwr ls); exit 1 unless finished:completed."""
    import tomllib

    overrides: dict[str, object] = {}
    for item in config:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--config {item!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value.strip()  # a bare word is a string
    from server.demo_study import simulation_study

    try:  # a wrong value (study.cutoff-set = "korea") fails here, in one line, not in the ServerApp
        simulation_study(app_dir, cast("dict[str, Scalar]", overrides))
    except SarcofedError as err:
        _fail(str(err))
    try:
        status = run_study(app_dir, name, overrides, timeout=timeout, coordinator_log=coordinator_log())
    except DeploymentError as err:
        _fail(str(err))
    typer.echo(json.dumps({"run-id": str(status.run_id), "status": status.status, "details": status.details}))
    if not status.ok:
        raise typer.Exit(1)


@study_app.command("status")
def status(run_id: int = typer.Argument(...), name: str = CONNECTION) -> None:
    """The final (or current) status of a run, from flwr ls; exit 1 if it failed."""
    try:
        found = run_status(run_id, name)
    except DeploymentError as err:
        _fail(str(err))
    typer.echo(json.dumps({"run-id": str(found.run_id), "status": found.status, "details": found.details}))
    if found.finished and not found.ok:
        raise typer.Exit(1)


@study_app.command("proxy")
def proxy(
    listen: str = typer.Option("0.0.0.0:9092", "--listen", help="host:port the sites connect to."),
    superlink_address: str = typer.Option("127.0.0.1:9093", "--superlink", help="The SuperLink (local)."),
    certs_dir: Path = typer.Option(..., "--certs", help="Folder from `sarcofed study certs`."),
) -> None:
    """Expose only the Fleet API to the sites (Control stays on the coordinator machine)."""
    from server.proxy import serve

    serve(listen, superlink_address, certs_dir)


def register(target: typer.Typer) -> None:
    """Add these commands (certs, superlink, connect, register, run, status, proxy) to ``target``."""
    target.registered_commands.extend(study_app.registered_commands)
