"""``sarcofed demo ...``: synthetic demo hospitals."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.cli_help import sarcofed_typer
from client.render import counting_progress
from protocols.study import DemoSection

#: The hospitals of the demo study (``demo.slices`` / ``demo.size``): `demo make` writes the same.
DEMO_HOSPITALS = DemoSection()

demo_app = sarcofed_typer(help="Synthetic demo hospitals (no real patient data).", no_args_is_help=True)


class DemoSite(BaseModel):
    """One written demo site, as printed by ``--json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    name: str
    convention: str
    mask_format: str
    slices: int
    description: str


class DemoResult(BaseModel):
    """What ``sarcofed demo make`` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: str
    seed: int
    size: int
    seconds: float
    sites: list[DemoSite]
    series: str | None = None


def make(
    out_dir: Path = typer.Argument(
        ..., help="Folder to create the demo sites in (site-0, site-1, ...).", show_default=False
    ),
    sites: int = typer.Option(3, "--sites", min=1, max=64, help="How many demo hospitals to write."),
    slices: int = typer.Option(
        # min: what a demo study accepts (protocols.study.DemoSection.slices, ge=2)
        DEMO_HOSPITALS.slices,
        "--slices",
        min=2,
        max=500,
        help="Labelled L3 slices per hospital.",
    ),
    size: int = typer.Option(
        DEMO_HOSPITALS.size, "--size", min=32, max=1024, help="Image size in pixels (square)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed: the same seed writes the same data."),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty folder, replacing site-N folders."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON (for scripts)."),
    series: bool = typer.Option(
        False,
        "--series",
        help="Also write a whole synthetic abdominal CT series (T11 to sacrum, shuffled file names, "
        "plus a distractor series) in OUT_DIR/series, for `sarcofed site workbench`.",
    ),
) -> None:
    """Write synthetic demo hospitals: CT L3 slices of made-up patients with labels.

    Each site-N folder is a complete site dataset (site.toml + manifest.csv, single-frame CT
    DICOM files, masks) that `sarcofed site check` and the site node accept. Sites differ like
    real hospitals: pixel spacing, noise, pixel storage, mask format and values, and label
    convention (the first three: reference-like, psoas left out, IMAT included in muscle).
    The manifest's `reference` column holds each slice labelled under the Alberta reference
    convention, so label conventions can be compared without any model.

    No real patient data is involved; patient IDs are pseudonyms like DEMO-0-007.
    """
    from common.demo.hospitals import SITE_PROFILES, make_demo, site_profile

    logging.getLogger("highdicom").setLevel(logging.ERROR)
    console, errors = Console(), Console(stderr=True)
    if out_dir.exists() and not out_dir.is_dir():
        errors.print(f"[red]{escape(str(out_dir))} is a file:[/red] give a folder for the demo sites.")
        raise typer.Exit(1)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        errors.print(
            f"[red]{escape(str(out_dir))} is not empty.[/red] Choose a new folder, or pass --force to "
            "replace its site-N folders."
        )
        raise typer.Exit(1)
    if sites > len(SITE_PROFILES) and not as_json:
        console.print(
            f"[yellow]Only {len(SITE_PROFILES)} site profiles exist: sites beyond that repeat a "
            "profile with new patients.[/yellow]"
        )
    start = time.perf_counter()
    if as_json:
        paths = make_demo(out_dir, sites=sites, slices=slices, size=size, seed=seed, force=force)
    else:
        with counting_progress("writing demo slices", console, total=sites * slices) as on_slice:
            paths = make_demo(
                out_dir,
                sites=sites,
                slices=slices,
                size=size,
                seed=seed,
                force=force,
                on_slice=on_slice,
            )
    series_dir = None
    if series:
        from common.demo.series import make_series

        series_dir = make_series(out_dir / "series", seed=seed).folder
    seconds = time.perf_counter() - start
    result = DemoResult(
        series=str(series_dir) if series_dir else None,
        out_dir=str(out_dir),
        seed=seed,
        size=size,
        seconds=round(seconds, 2),
        sites=[
            DemoSite(
                path=str(path),
                name=(profile := site_profile(i)).name,
                convention=profile.key,
                mask_format=profile.mask_suffix,
                slices=slices,
                description=profile.describe(),
            )
            for i, path in enumerate(paths)
        ],
    )
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    table = Table(title=f"Demo hospitals in {escape(str(out_dir))}", title_justify="left")
    for column in ("folder", "name", "label convention", "masks", "slices"):
        table.add_column(column)
    for site in result.sites:
        table.add_row(
            escape(Path(site.path).name),
            escape(site.name),
            escape(site.convention),
            site.mask_format,
            str(site.slices),
        )
    console.print(table)
    if series_dir:
        console.print(
            "Whole CT series for the workbench: "
            f"[bold]sarcofed site workbench {escape(str(series_dir))}[/bold]"
        )
    console.print(
        f"Wrote {sites * slices} slices ({size}x{size}) in {seconds:.1f} s. "
        f"Next: [bold]sarcofed site check {escape(str(paths[0]))}[/bold]"
    )


demo_app.command("make")(make)
