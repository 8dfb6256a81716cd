"""``sarcofed site audit | keys | join | policy``: what a hospital runs to join a study
on Flower's deployment engine and to see what it sent. ``register(site_app)`` adds them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.allowlist import code_hash, current_app_hash, loaded_code_root
from client.audit import AuditLogError, audit_path, read_audit, verify_chain
from client.deploy import (
    DEFAULT_RUNTIME_PORT,
    JoinSpec,
    default_keys_dir,
    generate_site_keys,
    shell_line,
    site_keys,
    supernode_command,
    supernode_env,
)
from client.policy import SitePolicy, load_policy, policy_path, write_policy
from common.errors import SiteFolderError

SITE_DIR = typer.Argument(
    ..., help="The site folder (holding site.toml and manifest.csv).", show_default=False
)

policy_app = typer.Typer(
    help="The site's release policy (policy.toml) and app allow-list.", no_args_is_help=True
)


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]{escape(message)}[/red]")
    raise typer.Exit(1)


def audit(
    site_dir: Path = SITE_DIR,
    as_json: bool = typer.Option(
        False, "--json", help="Print the entries as JSON lines (payloads included)."
    ),
    run: int | None = typer.Option(None, "--run", help="Only this run id."),
    verify: bool = typer.Option(False, "--verify", help="Check the hash chain (edited or removed lines)."),
) -> None:
    """Show the site's audit log: every instruction received and every reply sent or refused.

    The log is SITE_DIR.audit.jsonl, beside the site folder. Each row is one event; the
    payload column is the sha256 of exactly what left (use --json to see the payload).
    """
    path = audit_path(site_dir)
    if not path.exists():
        _fail(f"{path}: no audit log yet (nothing was received)")
    try:
        entries = [e for e in read_audit(path) if run is None or e.run_id == run]
    except AuditLogError as err:
        _fail(str(err))
    if as_json:
        for entry in entries:
            typer.echo(entry.model_dump_json())
    else:
        table = Table(title=str(path))
        for column in ("time (UTC)", "event", "run", "task", "app", "payload sha256", "detail"):
            table.add_column(column)
        style = {"sent": "green", "refused": "red", "received": "cyan"}
        for e in entries:
            size = f"{len(json.dumps(e.payload))} B" if e.payload is not None else ""
            table.add_row(
                e.time[:19],
                f"[{style[e.event]}]{e.event}[/]",
                str(e.run_id),
                e.task,
                e.app_hash[:12],
                f"{e.payload_sha256[:12]} {size}".strip(),
                escape(e.detail or ""),
            )
        Console().print(table)
    if verify:
        problems = verify_chain(path)
        if problems:
            _fail("audit log chain broken: " + "; ".join(problems))
        if not as_json:
            Console().print("[green]hash chain intact[/green]")


def keys(
    site_dir: Path = SITE_DIR,
    out: Path | None = typer.Option(
        None, "--out", help="Key folder (default: SITE_DIR.keys beside the site)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Make this site's SuperNode key pair (EC P-384). Send the .pub file to the coordinator."""
    folder = out or default_keys_dir(site_dir)
    try:
        made = generate_site_keys(folder, overwrite=force)
    except FileExistsError as err:
        _fail(str(err))
    console = Console()
    console.print(f"private key (stays here, mode 0600): {escape(str(made.private_key))}")
    console.print(f"public key (send to the coordinator): {escape(str(made.public_key))}")


def join(
    site_dir: Path = SITE_DIR,
    superlink: str = typer.Option(..., "--superlink", help="host:port the coordinator gave you (Fleet API)."),
    ca: Path = typer.Option(..., "--ca", help="The study CA certificate (ca.crt) from the coordinator."),
    key: Path | None = typer.Option(
        None, "--key", help="Private key (default: SITE_DIR.keys/supernode_ec384)."
    ),
    port: int = typer.Option(DEFAULT_RUNTIME_PORT, "--port", help="Local runtime port (one per SuperNode)."),
    run: bool = typer.Option(False, "--run", help="Start the SuperNode now instead of printing the command."),
) -> None:
    """Print (or run) the exact flower-supernode command that joins this site to a study."""
    private = key or site_keys(default_keys_dir(site_dir)).private_key
    for path, what in (
        (private, "private key (make it with `sarcofed site keys`)"),
        (ca, "study CA certificate"),
    ):
        if not Path(path).exists():
            _fail(f"{path}: {what} not found")
    if not (Path(site_dir) / "site.toml").exists():
        _fail(f"{site_dir}: no site.toml; run `sarcofed site check` on the right folder first")
    errors = Console(stderr=True)
    try:
        policy = load_policy(site_dir)
    except SiteFolderError as err:
        _fail(str(err))
    if not policy_path(site_dir).exists():
        errors.print("[yellow]no policy.toml: the defaults apply (see `sarcofed site policy show`).[/yellow]")
    if not policy.allowed_apps:
        errors.print(
            "[yellow]allowed-apps is empty: any sarcofed code the coordinator sends may run. "
            "Pin the code you reviewed with `sarcofed site policy init --pin` or `policy allow`.[/yellow]"
        )
    cmd = supernode_command(JoinSpec(Path(site_dir), superlink, ca, private, runtime_port=port))
    if not run:
        typer.echo(shell_line(cmd))
        return
    exe = shutil.which(cmd[0])
    if exe is None:
        _fail(f"{cmd[0]} not found on PATH; activate the environment sarcofed is installed in")
    os.execve(exe, cmd, supernode_env())


@policy_app.command("show")
def policy_show(
    site_dir: Path = SITE_DIR, as_json: bool = typer.Option(False, "--json", help="JSON instead of TOML.")
) -> None:
    """The policy in force (policy.toml, or the documented defaults when it is absent)."""
    try:
        policy = load_policy(site_dir)
    except SiteFolderError as err:
        _fail(str(err))
    if as_json:
        typer.echo(policy.model_dump_json(by_alias=True, indent=2))
    else:
        source = policy_path(site_dir) if policy_path(site_dir).exists() else "defaults (no policy.toml)"
        typer.echo(f"# in force: {source}\n{policy.to_toml()}")


@policy_app.command("init")
def policy_init(
    site_dir: Path = SITE_DIR,
    pin: bool = typer.Option(
        True, "--pin/--no-pin", help="Pin the hash of the sarcofed code installed here."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing policy.toml."),
) -> None:
    """Write policy.toml with the defaults (edit it afterwards), pinning the installed code."""
    if policy_path(site_dir).exists() and not force:
        _fail(f"{policy_path(site_dir)} exists; edit it, or pass --force to start from the defaults")
    policy = SitePolicy(allowed_apps=(current_app_hash(),) if pin else ())
    typer.echo(f"wrote {write_policy(site_dir, policy)}")


@policy_app.command("hash")
def policy_hash(
    code: Path | None = typer.Argument(
        None, help="A sarcofed checkout or unpacked app bundle; default: the code installed here."
    ),
) -> None:
    """sha256 of the sarcofed code a site reviewed (what allowed-apps lists)."""
    root = code or loaded_code_root()
    try:
        typer.echo(code_hash(root))
    except FileNotFoundError as err:
        _fail(str(err))


@policy_app.command("allow")
def policy_allow(
    site_dir: Path = SITE_DIR, app_hash: str = typer.Argument(..., help="sha256 to allow.")
) -> None:
    """Add an app hash to allowed-apps in policy.toml."""
    try:
        policy = load_policy(site_dir)
        updated = SitePolicy.model_validate(
            policy.model_dump() | {"allowed_apps": tuple(dict.fromkeys((*policy.allowed_apps, app_hash)))}
        )
    except (SiteFolderError, ValueError) as err:
        _fail(str(err))
    write_policy(site_dir, updated)
    typer.echo(f"allowed-apps: {', '.join(dict.fromkeys(updated.allowed_apps))}")


def register(site_app: typer.Typer) -> None:
    """Add ``audit``, ``keys``, ``join`` and the ``policy`` group to ``sarcofed site``."""
    site_app.command("audit")(audit)
    site_app.command("keys")(keys)
    site_app.command("join")(join)
    site_app.add_typer(policy_app, name="policy")
