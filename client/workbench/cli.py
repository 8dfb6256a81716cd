"""``sarcofed site workbench``: serve the workbench on this machine, next to the private data."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def workbench(
    folder: Path = typer.Argument(
        None,
        help="Folder holding a whole CT series (DICOM files, several series may be mixed). "
        "The workbench reads nothing outside it.",
        show_default=False,
    ),
    site: Path = typer.Option(
        None,
        "--site",
        help="Site dataset folder where 'Save to site' writes masks and manifest rows "
        "(created with site.toml and manifest.csv if new). Without it, saving is disabled.",
    ),
    model: Path = typer.Option(
        None,
        "--model",
        help="Study model (model.pt, or the run folder holding it) for 'Segment selected'. "
        "Without it, a rough HU-threshold pre-segmentation is used and labelled as such.",
    ),
    mask_format: str = typer.Option(
        "auto",
        "--mask-format",
        help="Mask format for saving: auto (the site's existing one, else png), "
        "png, npy, nii, nii.gz, tag or dcm.",
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to bind. Anything but 127.0.0.1 exposes private CT images to the network.",
    ),
    port: int = typer.Option(8765, "--port", help="Port to serve on."),
    demo_series: Path = typer.Option(
        None,
        "--demo-series",
        help="Write a synthetic abdominal CT series (plus a distractor series) "
        "into this folder and serve it (FOLDER is then not needed).",
    ),
) -> None:
    """Pick the L3 range in a whole CT series, segment it, correct the labels and save them.

    Shows axial, coronal and sagittal views with guide lines for the L3 range (or one slice),
    downloads the selected original DICOM files, pre-segments them (study model or an
    HU-threshold fallback), lets you paint muscle / SAT / VAT, shows areas, mean HU, SMI and
    the sarcopenia call, and saves slices into a site dataset folder. Local only.
    """
    import uvicorn

    from .api import create_app
    from .state import WorkbenchState

    console, errors = Console(), Console(stderr=True)
    if demo_series is not None:
        from common.demo.series import make_series

        demo = make_series(demo_series)
        console.print(
            f"Synthetic series written to {escape(str(demo.folder))} "
            f"(true L3: slices {demo.l3[0]}-{demo.l3[1]})"
        )
        folder = folder or demo.folder
        site = site or demo.folder.parent / f"{demo.folder.name}-site"
    if folder is None:
        raise click.UsageError(
            "Missing argument 'FOLDER': the folder holding the CT series "
            "(or --demo-series DIR to write a synthetic one)."
        )
    if not folder.is_dir():
        errors.print(
            f"[red]Not a folder:[/red] {escape(str(folder))}. Give the folder holding the CT series."
        )
        raise typer.Exit(2)
    if model is not None:
        from common.errors import SarcofedError
        from common.model import load_model, resolve_model_path

        try:  # read it now: a wrong file fails here, not at the first 'Segment selected'
            model = resolve_model_path(model)  # a run folder means its model.pt
            load_model(model)
        except SarcofedError as err:
            errors.print(f"[red]Model not usable:[/red] {escape(str(err))}")
            raise typer.Exit(2) from None
    allowed = ["127.0.0.1", "localhost", "[::1]"]
    if host not in LOOPBACK:
        errors.print(
            f"[yellow]Warning:[/yellow] binding {escape(host)}: anyone who can reach this machine on "
            f"port {port} can see these CT images. Use 127.0.0.1 unless you really mean it."
        )
        allowed = ["*"]
    state = WorkbenchState(root=folder, site_dir=site, model_path=model, mask_format=mask_format)
    app = create_app(state, allowed_hosts=allowed)
    shown = "127.0.0.1" if host in LOOPBACK else host
    console.print(
        f"Workbench on http://{escape(shown)}:{port}/  (folder {escape(str(state.root))}; Ctrl-C to stop)"
    )
    if site is None:
        console.print("No --site given: 'Save to site' is disabled.")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(site_app: typer.Typer) -> None:
    """Add the ``workbench`` command to ``sarcofed site``."""
    site_app.command("workbench")(workbench)
