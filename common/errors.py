"""Errors that name the file, the value and what to fix."""

from __future__ import annotations

from pathlib import Path

from protocols.classes import ExclusionReason


class SarcofedError(Exception):
    """Base class for user-facing errors (the CLI prints them without a traceback)."""


class SliceError(SarcofedError):
    """One manifest row cannot be used; the rest of the site still can."""

    def __init__(self, reason: ExclusionReason, path: Path | str, detail: str) -> None:
        self.reason = reason
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class SiteFolderError(SarcofedError):
    """The site folder itself is invalid (no usable site.toml / manifest.csv)."""

    def __init__(self, path: Path | str, detail: str) -> None:
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")
