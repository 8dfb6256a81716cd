"""``sarcofed study demo``: the whole demo study on this machine, in Flower's simulation engine.

Equivalent to ``flwr run .`` with three simulated hospitals: each makes its own synthetic
site on first use, the study model is trained for a few federated rounds, validated at
every site, and the report is written. Prints where the report is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.errors import SarcofedError
from common.paths import HOME_ENV, sarcofed_home
from server.flwr_cli import flower_env, flwr_run, local_superlink_pids, stop_processes


def app_dir() -> Path:
    """The Flower app folder (the one holding pyproject.toml with [tool.flwr.app])."""
    here = Path(__file__).resolve().parents[1]
    if not (here / "pyproject.toml").exists():
        raise SarcofedError(
            f"{here}: no pyproject.toml next to the sarcofed code; run from a source checkout "
            "(pip install -e .) so that Flower can build the app bundle"
        )
    return here


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
    quiet: Annotated[bool, typer.Option(help="Do not stream Flower's logs.")] = False,
    keep_superlink: Annotated[
        bool, typer.Option(help="Leave the local SuperLink running afterwards.")
    ] = False,
) -> None:
    """Run the whole demo study: train on synthetic hospitals, validate at each, write the report.

    Uses Flower's simulation engine (a local SuperLink started by `flwr run`). Hospitals make
    their synthetic data on first use under HOME/demo-sites; the run folder (model.pt,
    rounds.jsonl, report.json/.md/.html, CSV tables) goes under HOME/studies.
    """
    console = Console()
    root = (home or sarcofed_home()).expanduser().resolve()
    before = set(local_superlink_pids())
    started = time.monotonic()
    try:
        outcome = flwr_run(
            app_dir(),
            run_config={"study.output-dir": str(root / "studies"), "demo.dir": str(root / "demo-sites")}
            | ({"study.num-rounds": rounds} if rounds else {}),
            federation_config={"num-supernodes": sites},
            env=flower_env({HOME_ENV: str(root)}),
            echo=None if quiet else console.out,
        )
    except SarcofedError as err:
        Console(stderr=True).print(f"[red]error:[/] {err}")
        raise typer.Exit(1) from None
    finally:
        if not keep_superlink:
            stop_processes(sorted(set(local_superlink_pids()) - before))
    minutes = (time.monotonic() - started) / 60
    latest = root / "studies" / "LATEST"
    if not outcome.ok:
        Console(stderr=True).print(
            f"[red]the study failed[/] (run {outcome.run_id}: {outcome.status} {outcome.details}); "
            "see the log above"
        )
        raise typer.Exit(1)
    run_dir = Path(latest.read_text(encoding="utf-8").strip()) if latest.exists() else root / "studies"
    console.print(f"[green]demo study finished[/] in {minutes:.1f} min (run {outcome.run_id}).")
    console.print(f"report: {run_dir / 'report.html'}")
    console.print(f"        {run_dir / 'report.md'} and {run_dir / 'report.json'}")
