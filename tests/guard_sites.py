"""Site folders and guards for the site-guard tests, opened as the ClientApp opens them.

:func:`small_site` writes only what the guard reads (``site.toml`` and ``manifest.csv``, no
images); :func:`guard` opens the guard on it for one instruction and attaches the parsed site.
"""

from __future__ import annotations

from pathlib import Path

from client.guard import SiteGuard, open_guard
from client.policy import SitePolicy, write_policy
from common.dataset import load_site
from protocols import keys

#: The app hash every guard here is opened with.
APP = "a" * 64


def small_site(root: Path, manifest: str, name: str = "hospital-b") -> Path:
    """The folder ``root`` with ``manifest`` as its manifest.csv and a site.toml naming the site
    ``name``, labels 1/2/3 = muscle / subcutaneous fat / visceral fat."""
    root.mkdir()
    site_toml = f'name = "{name}"\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [2]\nvisceral_fat = [3]\n'
    (root / "site.toml").write_text(site_toml, encoding="utf-8")
    (root / "manifest.csv").write_text(manifest, encoding="utf-8")
    return root


def guard(
    site: Path, task: str = "evaluate", config: dict[str, object] | None = None, **policy: object
) -> SiteGuard:
    """The guard as the ClientApp opens it (run 3): instruction checked, then the parsed site
    attached. With ``policy`` settings, a policy.toml of them (the rest default) is written
    first; without, the site's policy.toml stays as it is."""
    if policy:
        write_policy(site, SitePolicy(**policy))  # type: ignore[arg-type]
    opened = open_guard(site, run_id=3, task=task, config=config or {keys.TASK: task}, app_hash=APP)
    opened.attach(load_site(site))
    return opened
