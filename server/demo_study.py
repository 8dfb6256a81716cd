"""``sarcofed study demo``: the whole demo study on this machine, in Flower's simulation engine.

Makes the synthetic hospitals (:func:`make_demo_sites`, those missing only), then runs the
equivalent of ``flwr run .`` with three simulated hospitals, the seed's study: the two that
label by the study protocol train the study model for a few federated rounds, the third (psoas
left out: the study's ``study.exclude-from-training``) is an external site; the model is
validated at every site and the report is written. Prints the
study's summary (each site with its role and n, each pooled group) and where the report is.
The simulated sites only read their folders: the demo generator (``common.demo``) runs
here, never inside a ClientApp, and is not in the app bundle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from common.dataset import MANIFEST_CSV
from common.errors import SarcofedError
from common.paths import HOME_ENV, demo_sites_dir, sarcofed_home, simulated_site_dir
from protocols.study import Scalar, StudyConfig
from server.deploy import flwr_env
from server.flwr_cli import flwr_run, local_superlink_pids, stop_processes

log = logging.getLogger(__name__)


def app_dir() -> Path:
    """The Flower app folder (the one holding pyproject.toml with [tool.flwr.app])."""
    here = Path(__file__).resolve().parents[1]
    if not (here / "pyproject.toml").exists():
        raise SarcofedError(
            f"{here}: no pyproject.toml next to the sarcofed code; run from a source checkout "
            "(pip install -e .) so that Flower can build the app bundle"
        )
    return here


def simulation_study(app: Path, run_config: Mapping[str, Scalar]) -> StudyConfig:
    """The study that ``flwr run APP --run-config ...`` runs: pyproject's ``[tool.flwr.app.config]``
    fused with ``run_config`` exactly as Flower fuses them, then parsed."""
    from flwr.common.config import get_fused_config_from_dir

    try:
        flat = get_fused_config_from_dir(Path(app), dict(run_config))
        return StudyConfig.from_run_config(flat)
    except (ValueError, FileNotFoundError) as err:
        raise SarcofedError(
            f"{Path(app) / 'pyproject.toml'}: cannot read the study's run config: {err}"
        ) from err


def make_demo_sites(app: Path, run_config: Mapping[str, Scalar], sites: int) -> list[Path]:
    """The simulated hospitals of a ``flwr run`` with ``sites`` SuperNodes; those missing are made.

    Partition ``N`` reads ``<demo.dir>/site-N`` (``common.paths``); a folder that already
    holds a manifest.csv is used as it is. A missing one is written by
    ``common.demo.hospitals.make_site`` with ``study_site_profile(N)`` (the first two label by
    the study protocol and train; the others are validated as external sites), ``seed=N``,
    ``site_tag=str(N)`` and ``demo.slices`` slices of ``demo.size`` pixels, from the run
    config as the ClientApps will see it (:func:`simulation_study`).
    """
    from common.demo.hospitals import make_site, study_site_profile

    study = simulation_study(app, run_config)
    root = demo_sites_dir(study.demo.dir)
    site_dirs = []
    for partition in range(sites):
        site_dir = simulated_site_dir(root, partition)
        if not (site_dir / MANIFEST_CSV).exists():
            profile = study_site_profile(partition)
            log.info("making demo hospital %s (%s)", site_dir, profile.name)
            make_site(
                site_dir,
                profile,
                slices=study.demo.slices,
                size=study.demo.size,
                seed=partition,
                site_tag=str(partition),
            )
        site_dirs.append(site_dir)
    return site_dirs


def study_summary(run_dir: Path) -> list[str]:
    """The lines the CLI prints when a study has finished (``server.report.summary_lines``: each
    site with its role and n, each pooled group), from the run folder's ``report.json``."""
    from pydantic import ValidationError

    from protocols.report import StudyReport
    from server.report import summary_lines

    path = run_dir / "report.json"
    try:
        report = StudyReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as err:
        reason = str(err).splitlines()[0]
        return [f"{path}: cannot read the study report for a summary ({reason}); see report.html"]
    return summary_lines(report)


def demo_study_cmd(
    sites: Annotated[int, typer.Option(min=2, help="Number of simulated hospitals.")] = 3,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Federated training rounds (default: pyproject's study.num-rounds)."),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(help="Where demo sites and studies go (default $SARCOFED_HOME or ~/sarcofed)."),
    ] = None,
    # on/off flags without a --no- twin: the twin only widens the help table (default: off)
    quiet: Annotated[bool, typer.Option("--quiet", help="Do not stream Flower's logs.")] = False,
    make_only: Annotated[
        bool,
        typer.Option(
            "--make-only", help="Only make the demo hospitals (HOME/demo-sites), for a later `flwr run .`."
        ),
    ] = False,
    keep_superlink: Annotated[
        bool, typer.Option("--keep-superlink", help="Leave the local SuperLink running afterwards.")
    ] = False,
) -> None:
    """Run the whole demo study: train on synthetic hospitals, validate at each, write the report.

    Uses Flower's simulation engine (a local SuperLink started by `flwr run`). The synthetic
    hospitals are made first under HOME/demo-sites (only those missing; existing ones are
    reused); the run folder (model.pt, rounds.jsonl, report.json/.md/.html, CSV tables) goes
    under HOME/studies.
    """
    console = Console()
    root = (home or sarcofed_home()).expanduser().resolve()
    run_config: dict[str, Scalar] = {
        "study.output-dir": str(root / "studies"),
        "demo.dir": str(root / "demo-sites"),
    } | ({"study.num-rounds": rounds} if rounds else {})
    started = time.monotonic()
    try:
        with console.status(f"making the demo hospitals in {escape(str(root / 'demo-sites'))} (once) ..."):
            made = make_demo_sites(app_dir(), run_config, sites)
    except SarcofedError as err:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(1) from None
    if make_only:
        # paths and names verbatim: a folder called "[x]" is not rich markup
        console.print(
            f"demo hospitals ready in {root / 'demo-sites'}: {', '.join(p.name for p in made)}", markup=False
        )
        console.print(
            f"run a study on them with: flwr run . --run-config 'demo.dir=\"{root / 'demo-sites'}\"'",
            markup=False,
        )
        return
    before = set(local_superlink_pids())
    try:
        outcome = flwr_run(
            app_dir(),
            run_config=run_config,
            federation_config={"num-supernodes": sites},
            env=flwr_env(extra={HOME_ENV: str(root)}),
            echo=None if quiet else console.out,
        )
    except SarcofedError as err:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(1) from None
    finally:
        if not keep_superlink:
            stop_processes(sorted(set(local_superlink_pids()) - before))
    minutes = (time.monotonic() - started) / 60
    latest = root / "studies" / "LATEST"
    if not outcome.ok:
        state = escape(f"{outcome.status} {outcome.details}")
        Console(stderr=True).print(
            f"[red]the study failed[/] (run {outcome.run_id}: {state}); see the log above"
        )
        raise typer.Exit(1)
    run_dir = Path(latest.read_text(encoding="utf-8").strip()) if latest.exists() else root / "studies"
    console.print(f"[green]demo study finished[/] in {minutes:.1f} min (run {outcome.run_id}).")
    for line in study_summary(run_dir):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {run_dir / 'report.html'}", markup=False)
    console.print(f"        {run_dir / 'report.md'} and {run_dir / 'report.json'}", markup=False)
