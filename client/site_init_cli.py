"""``sarcofed site init SOURCE --out SITE_DIR``: the thin command over ``client.site_init``."""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.render import counting_progress

if TYPE_CHECKING:
    from client.site_init import InitReport

#: Files shown per reason before "... and N more" (the JSON lists them all).
EXAMPLES = 3


def init(
    source: Path = typer.Argument(
        ...,
        help="The export folder: CT slices with their masks (read only; nothing is copied or moved).",
        show_default=False,
    ),
    out: Path = typer.Option(
        ..., "--out", help="The site folder to write (site.toml, manifest.csv).", show_default=False
    ),
    name: str | None = typer.Option(
        None, "--name", help="The site's name in reports (a pseudonym); default the folder's name."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing site.toml and manifest.csv."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
) -> None:
    """Build a site folder from what the hospital already has, without copying any image.

    Pairs CT slices with their masks in SOURCE: Slice-O-Matic (IMG0001.dcm + IMG0001.tag
    or IMG0001.dcm.tag), masks named after their image (.nii, .nii.gz, .png, .npy), and
    DICOM SEG files by the SOPInstanceUID they reference (their names do not matter).
    Every file it cannot pair is listed with the reason.

    Then it proposes the label mapping from the data: what each mask value looks like
    (muscle, subcutaneous or visceral fat, IMAT, background) from the HU of its pixels and
    where they lie. It writes SITE_DIR/site.toml (data_root = SOURCE, the proposed labels
    table for you to confirm) and SITE_DIR/manifest.csv (group = PatientID hashed with a secret
    kept in SITE_DIR/.group-secret, never the ID; height and sex from DICOM when present).

    Whole CT series without masks are listed with a suggested L3 range and the command that
    opens them in the workbench. Next: `sarcofed site check SITE_DIR`.

    Exit status: 0 when a site was written, 1 when nothing could be paired or SITE_DIR
    already holds a site (use --force).
    """
    from client.site_init import SiteInitError, init_site

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    console, errors = Console(), Console(stderr=True)
    try:
        if as_json:
            report = init_site(source, out, name=name, force=force)
        else:
            with counting_progress("reading pairs", console) as on_pair:
                report = init_site(source, out, name=name, force=force, on_pair=on_pair)
    except SiteInitError as exc:
        errors.print(f"[red]Cannot init the site:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render_init(report, console)
    if not report.n_rows:
        if not as_json:
            errors.print(
                "[red]No usable image-mask pair found:[/red] nothing written (see the reasons above)."
            )
        raise typer.Exit(1)


def render_init(report: InitReport, console: Console) -> None:
    """The init report for the person at the site (it names files: keep it local)."""
    console.print(f"[bold]Export[/bold] {escape(report.source)}")
    for how, count in report.paired_by.items():
        console.print(f"  {count} slice(s) paired: {escape(how)}")
    console.print(
        f"  {report.n_rows} manifest row(s); {len(report.unpaired)} file(s) not paired or not usable"
    )
    if report.proposal.guesses:
        console.print("Mask values, from the images:")
        for guess in report.proposal.guesses:
            console.print(f"- {escape(guess.sentence)}", highlight=False)
        if report.proposal.note:
            console.print(escape(report.proposal.note), highlight=False)
    if report.unpaired:
        by_reason: dict[str, list[str]] = defaultdict(list)
        for problem in report.unpaired:
            by_reason[problem.reason].append(
                f"{problem.file} ({problem.detail})" if problem.detail else problem.file
            )
        console.print(f"[yellow]Not paired or not usable ({len(report.unpaired)} files):[/yellow]")
        for reason, files in by_reason.items():
            shown = ", ".join(files[:EXAMPLES]) + (
                f" ... and {len(files) - EXAMPLES} more" if len(files) > EXAMPLES else ""
            )
            console.print(f"- {len(files)} x {escape(reason)}: {escape(shown)}", highlight=False)
    if report.series:
        table = Table(title="CT series without masks (label L3 in the workbench)", title_justify="left")
        for column in ("series", "slices", "suggested L3", "folder"):
            table.add_column(column, overflow="fold")
        for series in report.series:
            l3 = f"{series.l3_first}-{series.l3_last}" if series.l3_first is not None else "-"
            table.add_row(
                escape(series.description or series.series_uid), str(series.slices), l3, escape(series.folder)
            )
        console.print(table)
        for series in report.series:
            console.print(f"  {escape(series.command)}", highlight=False)
    if not report.written:
        return
    console.print(f"[green]Wrote[/green] {escape(', '.join(report.written))} in {escape(report.site_dir)}")
    if report.proposal.labels is None:
        console.print(
            escape("[labels] in site.toml is INCOMPLETE: fill in the values the data could not tell."),
            style="red",
        )
    else:
        console.print(escape("site.toml holds the PROPOSED [labels]: confirm it (or fix it):"))
        console.print(report.proposal.toml().rstrip("\n"), markup=False, highlight=False)
    console.print(f"Next: {escape(report.next_command)}", highlight=False)


def _paragraphs(doc: str | None) -> str:
    """The docstring with each paragraph on one line (rich help keeps line breaks) and no markup."""
    text = inspect.cleandoc(doc or "")
    return "\n\n".join(escape(" ".join(p.split())) for p in text.split("\n\n"))


def register(site_app: typer.Typer) -> None:
    """Add the ``init`` command to ``sarcofed site``."""
    site_app.command("init", help=_paragraphs(init.__doc__))(init)
