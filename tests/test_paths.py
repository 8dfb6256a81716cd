"""``$SARCOFED_HOME``: one owner, and the folders a study and a simulation use under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.paths import demo_sites_dir, sarcofed_home, simulated_site_dir, studies_dir


def test_home_is_sarcofed_home_or_the_users_sarcofed_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SARCOFED_HOME", str(tmp_path / "h"))
    assert sarcofed_home() == tmp_path / "h"
    assert studies_dir() == tmp_path / "h" / "studies"
    assert demo_sites_dir() == tmp_path / "h" / "demo-sites"
    monkeypatch.delenv("SARCOFED_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert sarcofed_home() == tmp_path / "user" / "sarcofed"


def test_configured_folders_win_and_partitions_map_to_site_folders(tmp_path: Path) -> None:
    assert studies_dir(str(tmp_path / "runs")) == tmp_path / "runs"
    assert demo_sites_dir(str(tmp_path / "sites")) == tmp_path / "sites"
    assert simulated_site_dir(tmp_path / "sites", 2) == tmp_path / "sites" / "site-2"


def test_no_other_module_reads_sarcofed_home_itself() -> None:
    """One owner: every other module asks ``common.paths``."""
    root = Path(__file__).resolve().parents[1]
    readers = [
        str(path.relative_to(root))
        for package in ("protocols", "common", "client", "server")
        for path in (root / package).rglob("*.py")
        if '"SARCOFED_HOME"' in path.read_text(encoding="utf-8") and path != root / "common" / "paths.py"
    ]
    assert readers == []
