"""Where sarcofed keeps its own files when a study does not say: ``$SARCOFED_HOME``.

The one owner of that environment variable (default ``~/sarcofed``) and of the folders
under it: ``studies/`` (run folders, when ``study.output-dir`` is empty) and
``demo-sites/`` (the simulated hospitals, when ``demo.dir`` is empty), where partition
``N`` of a simulation is the folder ``site-N``. Called by the ServerApp, the ClientApp in
simulation, ``sarcofed study demo`` and the coordinator's CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable that moves sarcofed's home folder.
HOME_ENV = "SARCOFED_HOME"


def sarcofed_home() -> Path:
    """``$SARCOFED_HOME``, or ``~/sarcofed`` when it is unset or empty."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / "sarcofed").expanduser()


def studies_dir(output_dir: str = "") -> Path:
    """Where run folders go: ``study.output-dir``, or ``$SARCOFED_HOME/studies`` when it is ""."""
    return Path(output_dir).expanduser() if output_dir else sarcofed_home() / "studies"


def demo_sites_dir(demo_dir: str = "") -> Path:
    """The simulated hospitals' folder: ``demo.dir``, or ``$SARCOFED_HOME/demo-sites`` when it is ""."""
    return Path(demo_dir).expanduser() if demo_dir else sarcofed_home() / "demo-sites"


def simulated_site_dir(demo_dir: Path, partition: int) -> Path:
    """The site folder of simulation partition ``partition``: ``<demo_dir>/site-<partition>``."""
    return Path(demo_dir) / f"site-{partition}"


__all__ = ["HOME_ENV", "demo_sites_dir", "sarcofed_home", "simulated_site_dir", "studies_dir"]
