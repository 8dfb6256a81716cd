"""``sarcofed site audit | keys | join | policy | cache``: what a hospital runs to join a study
on Flower's deployment engine, to see what it sent, and to empty its slice cache.
``register(site_app)`` adds them."""

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
from client.audit import AuditEntry, AuditVerification, audit_path, read_audit, verify_log
from client.audit_anchor import AuditLogError, anchor_path, key_path, read_anchor
from client.cli_help import sarcofed_typer
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
from common.slice_cache import CacheUsage, cache_folders, cache_usage, clear_cache

SITE_DIR = typer.Argument(
    ..., help="The site folder (holding site.toml and manifest.csv).", show_default=False
)

policy_app = sarcofed_typer(
    help="The site's release policy (policy.toml) and app allow-list.", no_args_is_help=True
)


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]{escape(message)}[/red]")
    raise typer.Exit(1)


def audit(
    site_dir: Path = SITE_DIR,
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print the entries as JSON lines (payloads included); when verifying, a last line "
        '{"verification": {...}} says what was checked.',
    ),
    run: int | None = typer.Option(None, "--run", help="Only this run id."),
    verify: bool = typer.Option(
        False, "--verify", help="Check the chain and the anchors; exit 1 if anything does not check."
    ),
    anchor: Path | None = typer.Option(
        None,
        "--anchor",
        help="Also check the log against this anchor, one you exported earlier and kept elsewhere "
        "(implies --verify).",
        show_default=False,
    ),
    export_anchor: Path | None = typer.Option(
        None,
        "--export-anchor",
        help="Write the anchor of the log as it is now to FILE ('-': print it), once the log verifies. "
        "Keep it off this machine.",
        show_default=False,
    ),
) -> None:
    """Show the site's audit log: every instruction received, every reply sent or refused; is it intact?

    The log is SITE_DIR.audit.jsonl, beside the site folder, with its key (.audit.key) and
    anchor (.audit.anchor.json); all three are readable by this account only and never sent.
    Each entry is chained to the one before with an HMAC under the key, so an edited,
    inserted or removed entry, or a log rewritten by someone without the key, shows. The
    anchor counts the entries and holds the last one's HMAC, so a log cut at the end shows.

    Why keep an anchor elsewhere: whoever can write to the folder holding the log can
    delete the log, its key and its anchor together (the site then looks as if it never
    logged anything), or cut the log and put back an older anchor. Only an anchor kept
    elsewhere shows that. Export one after each study (--export-anchor FILE), copy it to
    another machine or print it, and check the log against it later (--anchor FILE).
    """
    path = audit_path(site_dir)
    if not any(p.exists() for p in (path, key_path(path), anchor_path(path))):
        _fail(f"{path}: no audit log yet (nothing was received)")
    try:
        given = read_anchor(anchor) if anchor else None
        report = verify_log(path, given, anchor_source=f"given ({anchor})")
        entries = [e for e in read_audit(path) if run is None or e.run_id == run]
    except AuditLogError as err:
        _fail(str(err))
    checking = verify or anchor is not None or export_anchor is not None
    if export_anchor is not None and str(export_anchor) == "-":
        _export_anchor(report, None)
        return
    if as_json:
        for entry in entries:
            typer.echo(entry.model_dump_json())
        if checking:
            typer.echo(json.dumps({"verification": report.to_json()}))
    else:
        _audit_table(path, entries)
        _print_verification(report)
    if export_anchor is not None:
        _export_anchor(report, export_anchor)
    if checking and not report.intact:
        if as_json:
            _fail("audit log chain broken: " + "; ".join(report.problems))
        _fail(f"audit log chain broken: {len(report.problems)} problem(s), listed above")


def _audit_table(path: Path, entries: list[AuditEntry]) -> None:
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
            escape(e.task),
            e.app_hash[:12],
            f"{e.payload_sha256[:12]} {size}".strip(),
            escape(e.detail or ""),
        )
    Console().print(table)


def _print_verification(report: AuditVerification) -> None:
    """The chain's kind, whether it is intact, and each anchor compared, in words."""
    console = Console()
    kinds = {
        "keyed": f"keyed (HMAC-SHA256 with this site's key), {report.entries} entries",
        "partly keyed": (
            f"{report.entries} entries: the first {report.entries - report.keyed_entries} unkeyed "
            "(written by an older sarcofed, pinned by the first keyed entry), the rest keyed"
        ),
        "unkeyed": (
            f"unkeyed (written by an older sarcofed), {report.entries} entries: a rewrite with a "
            "recomputed chain would not show; the next entry keys the log"
        ),
        "empty": "empty",
    }
    console.print(f"chain: {kinds[report.chain]}")
    if report.intact:
        console.print("[green]hash chain intact[/green]")
    else:
        console.print(f"[red]the log does not verify ({len(report.problems)} problem(s)):[/red]")
        from_anchors = {f"{c.source} anchor: {c.problem}" for c in report.anchors}
        for problem in report.problems:
            if problem not in from_anchors:  # those are shown with their anchor below
                console.print(f"[red]  {escape(problem)}[/red]")
    for check in report.anchors:
        verdict = (
            "[green]matches: the log holds every entry it saw[/green]"
            if check.problem is None
            else f"[red]{escape(check.problem)}[/red]"
        )
        console.print(f"anchor {escape(check.source)}: entry {check.entries}, taken {check.time}: {verdict}")
    if not any(not c.source.startswith("stored") for c in report.anchors):
        console.print(
            "[yellow]no anchor kept elsewhere was checked: export one (--export-anchor FILE), keep it "
            "off this machine, and check against it later (--anchor FILE)[/yellow]"
        )
    if report.loose:
        console.print(
            f"[yellow]others can read {escape(', '.join(report.loose))}: the next entry tightens "
            "them to 0600[/yellow]"
        )


def _export_anchor(report: AuditVerification, out: Path | None) -> None:
    """Write (``out``) or print (``None``) the log's current anchor; only for an intact keyed log."""
    if not report.intact:
        _fail("not exporting an anchor for a log that does not verify: " + "; ".join(report.problems))
    if report.current_anchor is None:
        _fail(
            f"{report.path}: no anchor to export (the log is {report.chain}); "
            "the next instruction the site receives keys it"
        )
    text = report.current_anchor.model_dump_json(indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    Console(stderr=True).print(
        f"anchor written to {escape(str(out))} (entry {report.current_anchor.entries}); keep it off "
        "this machine and check the log against it with --anchor"
    )


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
    """Print (or run) the exact SuperNode command that joins this site to a study."""
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
        if policy.weights_dp.enabled:  # what the coordinator, who sees each update, can learn
            from common.dp_accounting import protection_summary

            summary = protection_summary(policy.weights_dp.noise_multiplier, 1)
            typer.echo(f"# [weights-dp], each training reply: {summary}")


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


def cache(
    site_dir: Path = SITE_DIR,
    clear: bool = typer.Option(False, "--clear", help="Delete every cached slice (they are decoded again)."),
    as_json: bool = typer.Option(False, "--json", help="Print the folders and counts as JSON."),
) -> None:
    """Show, or empty, the site's cache of decoded slices.

    Training and evaluation keep each decoded CT slice and mask in the site's cache, so later
    rounds and studies need not decode the files again: SITE_DIR/.sarcofed-cache, or
    $SARCOFED_HOME/cache/... when the site folder is not writable, or the folder that
    site.toml's cache_dir names (cache_dir = false turns it off). Entries are keyed by the
    files' content, so a changed file is always read again; they hold this site's pixel data,
    stay on this machine and are never sent. Deleting them is always safe. Past site.toml's
    cache_max_mb (default 10240 MiB) the least recently used entries are deleted.
    """
    from common.dataset import load_site

    try:
        site = load_site(site_dir)
    except SiteFolderError as err:
        _fail(f"{err.path}: {err.detail}")
    folders = [f for f in cache_folders(site.root, site.config.cache_dir) if f.is_dir()]
    found: list[CacheUsage] = [clear_cache(f) if clear else cache_usage(f) for f in folders]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "enabled": site.cache is not None,
                    "cleared": clear,
                    "max_bytes": site.config.cache_max_mb * 2**20,
                    "folders": [
                        {"folder": str(u.folder), "entries": u.entries, "bytes": u.bytes} for u in found
                    ],
                },
                indent=2,
            )
        )
        return
    if site.cache is None:
        typer.echo("The slice cache is off (site.toml cache_dir); slices are decoded every round.")
    if not found:
        typer.echo("No cached slices.")
    for usage in found:
        verb = "removed" if clear else "holds"
        typer.echo(
            f"{usage.folder}: {verb} {usage.entries} entries ({usage.bytes / 2**20:.1f} MiB; "
            f"cap {site.config.cache_max_mb} MiB, site.toml cache_max_mb)"
        )


def register(site_app: typer.Typer) -> None:
    """Add ``audit``, ``keys``, ``join``, ``cache`` and the ``policy`` group to ``sarcofed site``."""
    site_app.command("cache")(cache)
    site_app.command("audit")(audit)
    site_app.command("keys")(keys)
    site_app.command("join")(join)
    site_app.add_typer(policy_app, name="policy")
