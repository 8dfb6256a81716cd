"""``sarcofed site ...``: what a hospital runs next to its own data."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from client.cli_help import sarcofed_typer
from client.render import counting_progress, render_check
from common.errors import SiteFolderError

site_app = sarcofed_typer(
    help="Commands a hospital runs next to its private data (nothing here sends anything).",
    no_args_is_help=True,
)


@site_app.command("check")
def check(
    site_dir: Path = typer.Argument(
        ...,
        help="The site folder holding site.toml and manifest.csv (manifest paths are relative to "
        "it, or to its data_root).",
        show_default=False,
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as JSON (for scripts) instead of tables."
    ),
) -> None:
    """Check that a site folder is usable: read every CT slice and mask it lists, locally.

    SITE_DIR is the folder holding site.toml and manifest.csv; paths in the manifest are
    relative to it (or to site.toml's data_root, as `sarcofed site init` writes it).

    Reports how many slices are usable, why the others are excluded (file by file, with what
    to fix), which mask values were seen for each tissue, pixel spacing, and how much of each
    tissue lies in its expected HU range (muscle -29..150, subcutaneous fat -190..-30,
    visceral fat -150..-50). Nothing is sent anywhere; the report names your files, so keep it local.

    Also says what each mask value looks like from the images (muscle, subcutaneous or
    visceral fat, IMAT, background) and whether site.toml's labels table fits; when it
    clearly does not (e.g. muscle and subcutaneous fat swapped), prints the one that fits.

    Exit status: 0 if at least one slice is usable and the labels table fits the data; 1 if
    no slice is usable, the labels table clearly does not fit, or the folder is invalid.
    """
    from common.check import check_site
    from common.dataset import load_site

    # pydicom logs every oddity of every file; the report already says what matters.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console = Console()
    errors = Console(stderr=True)
    try:
        site = load_site(site_dir)
        if as_json:
            report = check_site(site)
        else:
            with counting_progress("checking slices", console) as on_row:
                report = check_site(site, on_row=on_row)
    except SiteFolderError as exc:
        errors.print(f"[red]Site folder not usable:[/red] {escape(str(exc.path))}\n{escape(exc.detail)}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render_check(report, console)
    if not report.usable:
        if as_json:
            raise typer.Exit(1)
        if report.n_usable == 0:
            errors.print("[red]No usable slice:[/red] fix the rows listed above and run the check again.")
        else:
            errors.print(
                "[red]"
                + escape("site.toml [labels] does not fit the data:")
                + "[/red] "
                + escape("replace its [labels] table with the one printed above and run the check again.")
            )
        raise typer.Exit(1)
