"""``client.redact``: what a reason may say when it leaves the site (no path, no manifest string)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.redact import PARENT, redact


def test_a_relative_site_folders_parent_is_replaced_only_as_a_whole_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data/hospital-b``: the parent ``data`` is a path part, never the end of ``metadata``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "hospital-b").mkdir(parents=True)
    site = Path("data/hospital-b")
    text = "cannot read the metadata of a series; see data/other.csv and big-data too"
    expected = f"cannot read the metadata of a series; see {PARENT}/other.csv and big-data too"
    assert redact(text, site) == expected
